"""`align eval MODEL DATA --reward SPEC ...`: generate with a trained policy, score, compare.

MODEL is any full model or peft-adapter folder (or hub name). The prompts of DATA (an RL
source: rows `{prompt, ...}`, the prompt a string or a message list rendered with the chat
template and the generation prompt; or `embedded` for the task's held-out prompts) are
completed greedily or by sampling, on the `hf` engine in this process or on the `vllm` engine,
and scored by every reward spec. The report gives each reward's mean and std, exact match
where rows carry an `answer`, and, with `--baseline`, MODEL's win rate over the baseline
under the first reward (ties count half) with a 95% confidence interval.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import EMBEDDED, ModelConfig, TaskConfig
from align.data import load_rows, tokenize_prompts
from align.data.prompts import reward_columns
from align.errors import ConfigError, OutputDirError
from align.reward_columns import COMPLETION_IDS_COLUMN
from align.rollout.base import Sampling

Z_95 = 1.959964  # two-sided 95% normal quantile


@dataclass
class EvalSettings:
    """How `align eval` generates (the CLI's options)."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64
    max_samples: int = 0  # 0: every prompt
    max_length: int = 1024  # longest prompt accepted, in tokens
    engine: str = "hf"  # hf (this process) or vllm
    split: str = "train"
    dtype: str = "auto"


def win_rate(scores: list[float], baseline: list[float]) -> dict[str, float]:
    """Share of prompts where `scores` beats `baseline` (ties count half), with a 95% normal
    confidence interval over the per-prompt outcomes (1, 0.5 or 0), clipped to [0, 1]."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]
    n = len(outcomes)
    rate = sum(outcomes) / n
    spread = statistics.pstdev(outcomes) if n > 1 else 0.0
    half = Z_95 * spread / math.sqrt(n)
    return {"win_rate": rate, "win_rate_ci_low": max(0.0, rate - half),
            "win_rate_ci_high": min(1.0, rate + half),
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5),
            "losses": outcomes.count(0.0)}


def load_prompt_rows(data: str, settings: EvalSettings) -> tuple[list[dict], str]:
    """The rows to complete and their source name (`embedded`: the task's held-out rows)."""
    if data == EMBEDDED:
        from align.tasks import load_task

        rows, source = load_task(TaskConfig()).held_out_rows(), "embedded:arithmetic(held-out)"
    else:
        rows, source = load_rows(data, settings.split), data
    return rows[: settings.max_samples or None], source


def generate(model_path: str, prompts: list[list[int]], tokenizer: Any,
             settings: EvalSettings) -> list[list[int]]:
    """Completion token ids of every prompt, with the chosen engine (see align.rollout.local)."""
    from align.rollout.local import generate_local

    if settings.engine not in ("hf", "vllm"):
        raise ConfigError(f"--engine must be hf or vllm, got {settings.engine!r}")
    if settings.engine == "vllm":
        from align.rollout.factory import vllm_installed

        if not vllm_installed():
            raise ConfigError("--engine vllm: vLLM is not installed (`make install` adds it); "
                              "or use --engine hf")
    sampling = Sampling(max_new_tokens=settings.max_new_tokens, greedy=settings.greedy,
                        temperature=settings.temperature, top_p=settings.top_p,
                        seed=settings.seed)
    model_cfg = ModelConfig(name_or_path=model_path, dtype=settings.dtype)
    return generate_local(model_cfg, tokenizer, prompts, sampling, settings.engine,
                          settings.batch_size, settings.max_length + settings.max_new_tokens)


def complete(model_path: str, rows: list[dict], source: str,
             settings: EvalSettings) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """(prompt texts, completion texts, reward columns) of `model_path` on `rows`: the columns
    are the rows' others, the prompts' messages where conversational, and `completion_ids`, as
    `align ppo` passes them (reward_models.protocol)."""
    from align.model_loading import load_tokenizer

    # tokenizer= the folder itself: an adapter folder holds its tokenizer but no config.json
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_path, tokenizer=model_path))
    examples = tokenize_prompts(rows, tokenizer, settings.max_length, source)
    ids = generate(model_path, [e.ids for e in examples], tokenizer, settings)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    return [e.text for e in examples], texts, {**reward_columns(examples),
                                               COMPLETION_IDS_COLUMN: ids}


def evaluate_policy(model: str, data: str, rewards: list[str], baseline: str | None = None,
                    settings: EvalSettings | None = None,
                    output: str | Path = "eval.json") -> dict[str, Any]:
    """Generate, score and compare; writes the report and `<output stem>.samples.jsonl`.

    Raises:
        ConfigError: no reward given, or a bad option.
        DataError, ModelError, RewardError: bad data, model or reward (each names the cause).
    """
    from reward_models import CombinedReward

    settings = settings or EvalSettings()
    if not rewards:
        raise ConfigError("give at least one --reward SPEC (e.g. "
                          "reward_models.builtin:exact_match)")
    output = Path(output)
    if output.parent and not output.parent.exists():
        raise OutputDirError(f"--output {output}: folder {output.parent} does not exist")
    scorer = CombinedReward.from_specs(rewards)
    rows, source = load_prompt_rows(data, settings)
    prompts, texts, by_column = complete(model, rows, source, settings)
    scores = scorer.score(prompts, texts, **by_column)
    report: dict[str, Any] = {"model": model, "data": source, "prompts": len(prompts),
                              "engine": settings.engine, "greedy": settings.greedy,
                              "rewards": _reward_stats(scores.per_reward)}
    answers = by_column.get("answer")
    if answers and all(isinstance(a, str) for a in answers):
        report["exact_match"] = _exact_match(data, texts, answers)
    first = scorer.names[0]
    samples = [{"prompt": p, "completion": t,
                "rewards": {n: v[i] for n, v in scores.per_reward.items()}}
               for i, (p, t) in enumerate(zip(prompts, texts))]
    if baseline is not None:
        _, base_texts, base_columns = complete(baseline, rows, source, settings)
        base = scorer.score(prompts, base_texts, **base_columns).per_reward
        ours, theirs = _paired(scores.per_reward[first], base[first])
        report["baseline"] = {"model": baseline, "reward": first,
                              "rewards": _reward_stats(base), **win_rate(ours, theirs)}
        for sample, text, i in zip(samples, base_texts, range(len(samples))):
            sample["baseline_completion"] = text
            sample["baseline_rewards"] = {n: v[i] for n, v in base.items()}
    _write(output, report, samples)
    return report


def samples_path(output: Path) -> Path:
    """`eval.json` -> `eval.samples.jsonl`, beside it."""
    return output.with_name(output.stem + ".samples.jsonl")


def format_eval_report(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for the terminal."""
    lines = [f"{report['model']} on {report['data']} ({report['prompts']} prompts, "
             f"{'greedy' if report['greedy'] else 'sampled'}, engine {report['engine']})"]
    for name, stats in report["rewards"].items():
        lines.append(f"  {name:<24} mean {stats['mean']:.4f}  std {stats['std']:.4f}")
    if "exact_match" in report:
        lines.append(f"  {'exact match':<24} {100 * report['exact_match']:.1f}%")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"  win rate over {b['model']} under {b['reward']}: "
                     f"{100 * b['win_rate']:.1f}% (95% CI {100 * b['win_rate_ci_low']:.1f}-"
                     f"{100 * b['win_rate_ci_high']:.1f}%; {b['wins']} wins, {b['ties']} ties, "
                     f"{b['losses']} losses)")
    return "\n".join(lines)


def _reward_stats(per_reward: dict[str, list[float | None]]) -> dict[str, dict[str, float]]:
    stats = {}
    for name, values in per_reward.items():
        present = [v for v in values if v is not None]
        stats[name] = {"mean": statistics.fmean(present) if present else float("nan"),
                       "std": statistics.pstdev(present) if len(present) > 1 else 0.0,
                       "scored": len(present)}
    return stats


def _paired(ours: list[float | None], theirs: list[float | None]
            ) -> tuple[list[float], list[float]]:
    """The prompts both models got a value for under the first reward."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    if not pairs:
        raise ConfigError("the first --reward scored no prompt for both models; the win rate "
                          "needs a reward that applies to them")
    return [a for a, _ in pairs], [b for _, b in pairs]


def _exact_match(data: str, texts: list[str], answers: list[str]) -> float:
    if data == EMBEDDED:
        from align.tasks import load_task

        return load_task(TaskConfig()).accuracy(texts, answers)
    from reward_models.builtin import exact_match

    return statistics.fmean(v for v in exact_match([], texts, answer=answers) if v is not None)


def _write(output: Path, report: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    try:
        output.write_text(json.dumps(report, indent=1) + "\n")
        with samples_path(output).open("w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
    except OSError as exc:
        raise OutputDirError(f"--output {output}: cannot write it: {exc}") from None
