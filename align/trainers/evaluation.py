"""Held-out generation metrics shared by every stage that trains a generator."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from align.config import EvalConfig
from align.distributed import WorkerGroup
from align.rollout import RolloutEngine, Sampling
from align.rollout.hf import HFEngine
from align.trainers.dispatch import can_split

# evaluator(completion, reference) -> correct?
Evaluator = Callable[[str, str], bool]


def exact_match(completion: str, reference: str) -> bool:
    """The default evaluator: equal after stripping surrounding white space."""
    return completion.strip() == reference.strip()


def exact_match_set(rows: Iterable[dict], max_samples: int) -> tuple[list[str], list[str]]:
    """(prompts, references) of the rows whose prompt and completion are strings, at most
    `max_samples` of them (0: all): what `final_exact_match` scores. Rows are read only until
    enough are found."""
    prompts: list[str] = []
    references: list[str] = []
    for row in rows:
        if max_samples and len(prompts) == max_samples:
            break
        if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            prompts.append(row["prompt"])
            references.append(row["completion"])
    return prompts, references


def final_exact_match(group: WorkerGroup, tokenizer, prompts: list[str], references: list[str],
                      cfg: EvalConfig, output_dir: Path,
                      is_correct: Evaluator = exact_match) -> dict[str, float]:
    """`exact_match_eval` at the end of a run, samples in `output_dir/eval_samples.jsonl`;
    {} when `eval.exact_match` is off or there are fewer prompts than workers."""
    if not cfg.exact_match or not can_split(group, len(prompts)):
        return {}
    return exact_match_eval(group, tokenizer, prompts, references, cfg,
                            output_dir / "eval_samples.jsonl", is_correct)


def generate_ids(engine: RolloutEngine | WorkerGroup, tokenizer, prompts: list[str],
                 max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Token ids of the greedy completions of `prompts` (EOS kept where generation stopped),
    in order, by a rollout engine (a policy WorkerGroup generates with its own workers, the
    `hf` engine)."""
    if isinstance(engine, WorkerGroup):
        engine = HFEngine(engine, batch_size)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    return engine.generate(ids, Sampling(max_new_tokens=max_new_tokens, greedy=True)).tokens


def generate_texts(engine: RolloutEngine | WorkerGroup, tokenizer, prompts: list[str],
                   max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of `prompts` as text, in order (see `generate_ids`)."""
    return [tokenizer.decode(t, skip_special_tokens=True)
            for t in generate_ids(engine, tokenizer, prompts, max_new_tokens, batch_size)]


def exact_match_eval(group: WorkerGroup, tokenizer, prompts: list[str], references: list[str],
                     cfg: EvalConfig, samples_path: Path | None = None,
                     is_correct: Evaluator = exact_match) -> dict[str, float]:
    """`eval/accuracy`: share of greedy completions `is_correct` accepts against the reference
    (default: equal with spaces stripped; a task passes its own evaluator).

    Every prompt, reference and generation is written to `samples_path` (JSONL) if given.
    """
    texts = generate_texts(group, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    correct = [is_correct(t, r) for t, r in zip(texts, references)]
    if samples_path is not None:
        write_eval_samples(samples_path, prompts, references, texts, correct)
    return {"eval/accuracy": sum(correct) / len(correct), "eval/samples": len(correct)}


def write_eval_samples(path: Path, prompts: list[str], references: list[str],
                       texts: list[str], correct: list[bool]) -> None:
    """One JSON line per held-out prompt: prompt, reference, generation, whether correct."""
    with Path(path).open("w") as f:
        for p, r, t, c in zip(prompts, references, texts, correct):
            f.write(json.dumps({"prompt": p, "reference": r, "generated": t,
                                "correct": c}) + "\n")
