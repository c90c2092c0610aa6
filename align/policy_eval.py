"""`align eval MODEL DATA --reward SPEC ...`: generate with a trained policy, score, compare.

MODEL is any full model or peft-adapter folder (or hub name). The prompts of DATA (an RL
source: rows `{prompt, ...}`, the prompt a string or a message list rendered with the chat
template and the generation prompt; or `embedded` for the task's held-out prompts) are
completed greedily or, k times each (`-k`), by sampling, on the `hf` engine in this process or
on the `vllm` engine (align.policy_sampling); with `--environment`/`--tool` each sample is a
multi-turn episode. Every reward spec scores the samples (an environment's `get_reward()` is
one more reward). The report gives each reward's mean, std and mean@k, exact match where rows
carry an `answer`, pass@k where correctness is known (the `answer`, or a first reward that is
0 or 1), the episodes' metrics, and, with `--baseline`, MODEL's win rate over the baseline
under the first reward (per prompt, its mean over the k samples; ties count half) with a 95%
confidence interval.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from align.config import EMBEDDED, TaskConfig
from align.data import load_rows
from align.errors import ConfigError, OutputDirError
from align.policy_sampling import (
    EvalSettings,
    Samples,
    complete,
    episode_record,
    load_eval_environment,
)

Z_95 = 1.959964  # two-sided 95% normal quantile


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


def evaluate_policy(model: str, data: str, rewards: list[str], baseline: str | None = None,
                    settings: EvalSettings | None = None,
                    output: str | Path = "eval.json") -> dict[str, Any]:
    """Generate, score and compare; writes the report and `<output stem>.samples.jsonl`.

    Raises:
        ConfigError: no reward given (and no environment reward), or a bad option.
        DataError, ModelError, RewardError: bad data, model or reward (each names the cause).
    """
    from align.episodes.rewards import with_environment_reward

    settings = settings or EvalSettings()
    settings.check()
    spec = load_eval_environment(settings)
    if not rewards and not (spec is not None and (spec.has_reward or spec.protocol == "turns")):
        raise ConfigError("give at least one --reward SPEC (e.g. "
                          "reward_models.builtin:exact_match), or an --environment class with "
                          "a get_reward() method or a TurnEnvironment")
    output = Path(output)
    if output.parent and not output.parent.exists():
        raise OutputDirError(f"--output {output}: folder {output.parent} does not exist")
    scorer = with_environment_reward(rewards, spec, 1.0)
    try:
        rows, source = load_prompt_rows(data, settings)
        ours = complete(model, rows, source, settings, spec)
        scores = score(scorer, ours)
        report = summarize(model, source, data, settings, ours, scores)
        samples = sample_records(ours, scores)
        if baseline is not None:
            theirs = complete(baseline, rows, source, settings, spec)
            base = score(scorer, theirs)
            first = scorer.names[0]
            ours_mean, theirs_mean = _paired(prompt_means(scores[first], ours.k),
                                             prompt_means(base[first], theirs.k))
            report["baseline"] = {"model": baseline, "reward": first,
                                  "rewards": _reward_stats(base, theirs.k),
                                  **win_rate(ours_mean, theirs_mean)}
            for sample, text, i in zip(samples, theirs.texts, range(len(samples))):
                sample["baseline_completion"] = text
                sample["baseline_rewards"] = {n: v[i] for n, v in base.items()}
    finally:
        scorer.close()
    _write(output, report, samples)
    return report


def score(scorer: Any, samples: Samples) -> dict[str, list[float | None]]:
    """Each reward's value of every sample (None where it does not apply); an episode that
    failed for infrastructure reasons gets None from every reward, as training leaves it
    out."""
    values = scorer.score(samples.prompts, samples.texts, update=False,
                          **samples.columns).per_reward
    if samples.episodes is None:
        return values
    failed = [e.infra_error is not None for e in samples.episodes]
    return {name: [None if f else v for f, v in zip(failed, column)]
            for name, column in values.items()}


def summarize(model: str, source: str, data: str, settings: EvalSettings, samples: Samples,
              scores: dict[str, list[float | None]]) -> dict[str, Any]:
    """The report of one model's samples (the baseline comparison is added after)."""
    from align.pass_at_k import pass_at_k_table

    k = samples.k
    report: dict[str, Any] = {"model": model, "data": source, "prompts": len(samples.texts) // k,
                              "samples_per_prompt": k, "engine": settings.engine,
                              "greedy": settings.greedy, "rewards": _reward_stats(scores, k)}
    answers = samples.columns.get("answer")
    if answers and all(isinstance(a, str) for a in answers):
        correct, judge = _exact_match(data, samples, answers), "answer (exact match)"
        report["exact_match"] = statistics.fmean(correct)
    else:
        first = next(iter(scores))
        correct, judge = _binary(scores[first]), f"{first} = 1"
    if correct is not None:
        report["pass_at_k"] = {"judged_by": judge, "n": k, **pass_at_k_table(
            [correct[p:p + k] for p in range(0, len(correct), k)])}
    if samples.episodes is not None:
        from align.episodes.assemble import episode_metrics

        env = settings.environment
        report["environment"] = {"spec": env.spec, "tools": env.tools,
                                 "max_turns": env.max_turns,
                                 "max_tokens_per_turn": env.max_tokens_per_turn,
                                 "max_episode_tokens": env.max_episode_tokens}
        report["episodes"] = {name.removeprefix("episodes/"): value
                              for name, value in episode_metrics(samples.episodes).items()}
    return report


def sample_records(samples: Samples, scores: dict[str, list[float | None]]
                   ) -> list[dict[str, Any]]:
    """One line of the samples file per sample: its prompt, completion and rewards, and its
    episode's conversation with an environment."""
    records = []
    for i, (prompt, text) in enumerate(zip(samples.prompts, samples.texts)):
        record = {"prompt_index": i // samples.k, "sample": i % samples.k, "prompt": prompt,
                  "completion": text, "rewards": {n: v[i] for n, v in scores.items()}}
        if samples.episodes is not None:
            record["episode"] = episode_record(samples.episodes[i])
        records.append(record)
    return records


def prompt_means(values: list[float | None], k: int) -> list[float | None]:
    """Each prompt's mean over its k samples' values (None where none applies)."""
    means = []
    for start in range(0, len(values), k):
        present = [v for v in values[start:start + k] if v is not None]
        means.append(statistics.fmean(present) if present else None)
    return means


def samples_path(output: Path) -> Path:
    """`eval.json` -> `eval.samples.jsonl`, beside it."""
    return output.with_name(output.stem + ".samples.jsonl")


def format_eval_report(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for the terminal."""
    k = report["samples_per_prompt"]
    how = "greedy" if report["greedy"] else f"sampled, {k} per prompt"
    lines = [f"{report['model']} on {report['data']} ({report['prompts']} prompts, {how}, "
             f"engine {report['engine']})"]
    for name, stats in report["rewards"].items():
        lines.append(f"  {name:<24} mean@{k} {stats[f'mean@{k}']:.4f}  std {stats['std']:.4f}")
    if "exact_match" in report:
        lines.append(f"  {'exact match':<24} {100 * report['exact_match']:.1f}%")
    if "pass_at_k" in report:
        table = report["pass_at_k"]
        shown = "  ".join(f"{key} {100 * value:.1f}%" for key, value in table.items()
                          if key.startswith("pass@"))
        lines.append(f"  {'pass@k':<24} {shown}  (correct: {table['judged_by']})")
    if "episodes" in report:
        e = report["episodes"]
        lines.append(f"  episodes: {e['turns_mean']:.2f} turns, {e['tool_calls']:.2f} tool "
                     f"calls ({e['tool_errors']:.2f} errors), {100 * e['truncated']:.1f}% "
                     f"truncated, drift rate {e['drift_rate']:.3f}, "
                     f"{e['infra_failures']:.0f} infrastructure failures")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"  win rate over {b['model']} under {b['reward']}: "
                     f"{100 * b['win_rate']:.1f}% (95% CI {100 * b['win_rate_ci_low']:.1f}-"
                     f"{100 * b['win_rate_ci_high']:.1f}%; {b['wins']} wins, {b['ties']} ties, "
                     f"{b['losses']} losses)")
    return "\n".join(lines)


def _reward_stats(per_reward: dict[str, list[float | None]], k: int
                  ) -> dict[str, dict[str, float]]:
    stats = {}
    for name, values in per_reward.items():
        present = [v for v in values if v is not None]
        mean = statistics.fmean(present) if present else float("nan")
        stats[name] = {"mean": mean, f"mean@{k}": mean,
                       "std": statistics.pstdev(present) if len(present) > 1 else 0.0,
                       "scored": len(present)}
    return stats


def _paired(ours: list[float | None], theirs: list[float | None]
            ) -> tuple[list[float], list[float]]:
    """The prompts both models got a value for under the first reward."""
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    if not pairs:
        raise ConfigError("the first reward scored no prompt for both models; the win rate "
                          "needs a reward that applies to them (give it first with --reward)")
    return [a for a, _ in pairs], [b for _, b in pairs]


def _exact_match(data: str, samples: Samples, answers: list[str]) -> list[bool]:
    """Whether each sample is its row's answer (the task's evaluator for `embedded`); an
    episode that failed for infrastructure reasons is not."""
    if data == EMBEDDED:
        from align.tasks import load_task

        task = load_task(TaskConfig())
        correct = [task.is_correct(t, a) for t, a in zip(samples.texts, answers)]
    else:
        from reward_models.builtin import exact_match

        correct = [v == 1.0 for v in exact_match([], samples.texts, answer=answers)]
    if samples.episodes is None:
        return correct
    return [c and e.infra_error is None for c, e in zip(correct, samples.episodes)]


def _binary(values: list[float | None]) -> list[bool] | None:
    """Correctness by a reward that only gives 0 or 1 (None counts as not correct), or None
    when it gives other values or none at all."""
    present = {v for v in values if v is not None}
    if not present or not present <= {0.0, 1.0}:
        return None
    return [v == 1.0 for v in values]


def _write(output: Path, report: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    try:
        output.write_text(json.dumps(report, indent=1) + "\n")
        with samples_path(output).open("w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
    except OSError as exc:
        raise OutputDirError(f"--output {output}: cannot write it: {exc}") from None
