"""Multi-turn, tool-calling GRPO: align's `ppo` with an environment against TRL's
`GRPOTrainer(environment_factory=...)`, same model, environment class, data and settings.

    python benchmarks/agentic_vs_trl.py [--steps 30] [--repeats 2] [--model DIR] [--seed N]
                                         [--malformed-calls end|respond] [--quick]

The environment is `agentic_env.Adder`, one class in TRL's documented form handed unchanged to
both: TRL as `environment_factory=Adder`, align as `environment.spec=benchmarks/agentic_env.py:
Adder`. Each prompt asks to add two digits (1 to 3) and submit the sum; the tools are
`add(a, b)` and `answer(value)`, and `get_reward` gives 0.5 for an `add` of the right numbers
and 0.5 for the right answer.

The model is a tiny Qwen2 (hidden 64, 2 layers) with Qwen2.5's chat template (TRL's copy, which
renders tools and parses Qwen2.5 / Hermes `<tool_call>` blocks) and a byte-level BPE tokenizer
of 512 pieces fitted to the rendered demonstrations, with `<tool_call>`, `<tool_response>` and
their closing tags as added tokens, as in Qwen2.5's tokenizer. A random model never writes a
tool call, so the parent first fine-tunes it once with `align sft` on demonstrations
(add, then answer, then "Done.": three model turns, two tool calls; `--sft-steps`, 200) and
both trainers start from that model (`--model DIR` starts from a folder saved before).

Settings, the same on both sides: 4 prompts x 4 episodes per step, at most 128 tokens after
the prompt per episode (model and tool turns together: TRL's `max_completion_length`, align's
`environment.max_episode_tokens`), at most 4 model turns (TRL: 3 tool-calling iterations),
temperature 1, full fine-tuning in fp32 on the CPU, lr 5e-4 constant, no KL term (TRL's
default beta 0), token-level loss (TRL's default `dapo`, align's `token`), rewards scaled by
the group's std, one optimizer step per batch of episodes. Generation is each tool's default
on the CPU: align's `hf` engine (its own decoding loop, which keeps an episode's keys and values
from turn to turn and checks drafted tokens: align.rollout.hf_decode), TRL's transformers
`generate`; both on the machine's cores (align: one worker, whose engine picks its decoding
threads by the model's size; TRL: `torch.set_num_threads(os.cpu_count())`). `--seed` sets both
tools' seed (sampling and data order; the prompts stay the same).

Reported per tool (median over the runs): episodes/s and completions/s (model turns, each one
engine call's sampled completion) over steps 2..N, the share of that time spent in rollouts,
turns, tool calls and tool errors per episode (a call that does not parse ends the episode in
both: TRL decodes the turn as text, align runs with `environment.on_malformed_call=end`;
`--malformed-calls respond` gives align's default, which answers with the error), the
mean reward of the first step's episodes (the starting model) and of the last five steps'
(the reward after N steps); the ratio is align's episodes/s over TRL's. Runs alternate A B A B,
each in a fresh subprocess (`side_by_side.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from side_by_side import (
    TOOLS,
    RunSpec,
    add_child_flags,
    align_overrides,
    alternate,
    run_as_child,
    train_trl,
    trl_common_args,
    write_jsonl,
)

HERE = Path(__file__).resolve().parent
ENV_FILE = HERE / "agentic_env.py"
GROUP = 4  # episodes per prompt
EPISODE_TOKENS = 128  # tokens after the prompt: model and tool turns
MAX_TURNS = 4  # model turns per episode (TRL: MAX_TURNS - 1 tool-calling iterations)
LR = 5e-4
DIGITS = range(1, 4)  # the numbers to add: few, so that guessing earns some reward
PROMPT_TOKENS = 320  # room for a prompt: about 290 tokens rendered with the tools
TAIL = 5  # the reward after N steps: mean over the last TAIL steps' episodes
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def demonstration(a: int, b: int) -> list[dict]:
    """A whole episode as the warm-up teaches it: add, answer, then a closing word."""
    def call(name: str, arguments: dict) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]}

    return [{"role": "user", "content": f"Add {a} and {b}, then submit the sum."},
            call("add", {"a": a, "b": b}), {"role": "tool", "name": "add", "content": str(a + b)},
            call("answer", {"value": a + b}),
            {"role": "tool", "name": "answer", "content": "Recorded."},
            {"role": "assistant", "content": "Done."}]


def tool_schemas() -> list[dict]:
    from agentic_env import Adder
    from transformers.utils import get_json_schema

    env = Adder()
    return [get_json_schema(env.add), get_json_schema(env.answer)]


def build_tokenizer() -> Any:
    """Byte-level BPE fitted to the rendered demonstrations; digits stay single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.chat_models import SPECIAL, chatml_tokenizer, trl_template

    template = trl_template("qwen2_5")
    renderer = chatml_tokenizer("qwen2")  # byte-level: renders any text
    renderer.chat_template = template
    corpus = [renderer.apply_chat_template(demonstration(a, b), tools=tool_schemas(),
                                           tokenize=False) for a in DIGITS for b in DIGITS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_tokens(TOOL_TOKENS)  # not special: decoding keeps them, as Qwen2.5's does
    tokenizer.chat_template = template
    return tokenizer


def save_base_model(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_rows(tokenizer: Any) -> list[dict]:
    """One `{prompt, completion}` row per model turn of every demonstration: the prompt is the
    conversation so far with the generation prompt, the completion the turn's text (align
    appends EOS, the `<|im_end|>` the model samples to end a turn)."""
    tools, rows = tool_schemas(), []
    for a in DIGITS:
        for b in DIGITS:
            messages = demonstration(a, b)
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False,
                                                       add_generation_prompt=True)
                through = tokenizer.apply_chat_template(messages[:i + 1], tools=tools,
                                                        tokenize=False)
                assert through.startswith(before), "the template is not prefix-preserving"
                turn = through[len(before):].removesuffix("\n").removesuffix("<|im_end|>")
                rows.append({"prompt": before, "completion": turn})
    return rows


def warm_up(folder: Path, steps: int) -> Path:
    """`align sft` of the base model on the demonstrations; returns the final model folder."""
    from transformers import AutoTokenizer

    base = save_base_model(folder / "base")
    data = write_jsonl(folder / "demonstrations.jsonl", sft_rows(
        AutoTokenizer.from_pretrained(base)))
    config = folder / "sft.yaml"
    config.write_text(
        f"output_dir: {folder / 'sft'}\nmodel:\n  name_or_path: {base}\n  dtype: float32\n"
        f"data:\n  train: {data}\n  max_length: {PROMPT_TOKENS + EPISODE_TOKENS}\n"
        f"trainer:\n  lr: 3.0e-3\n  scheduler: constant\n  max_steps: {steps}\n"
        "  global_batch_size: 16\n  micro_batch_size: 16\n  log_every: 10\n"
        "eval:\n  exact_match: false\ndistributed:\n  num_workers: 1\n  gpus_per_worker: 0\n")
    done = subprocess.run([sys.executable, "-m", "align.cli", "sft", str(config), "--quiet"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the SFT warm-up failed:\n{done.stderr[-3000:]}")
    return folder / "sft" / "final"


def write_prompts(folder: Path, num_rows: int) -> Path:
    """RL rows in TRL's conversational form; `a` and `b` reach the environment's reset."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(num_rows):
        a, b = rng.choice(DIGITS), rng.choice(DIGITS)
        rows.append({"prompt": [{"role": "user",
                                 "content": f"Add {a} and {b}, then submit the sum."}],
                     "a": a, "b": b})
    return write_jsonl(folder / "prompts.jsonl", rows)


# ------------------------------------------------------------------ one run of one tool


def run_align(spec: RunSpec) -> dict[str, Any]:
    from align.config import PPOConfig, load_config
    from align.tracking import read_metrics
    from align.trainers.ppo import PPOTrainer

    cfg = load_config(PPOConfig, None, [
        *align_overrides(spec), "distributed.num_workers=1", "distributed.gpus_per_worker=0",
        f"trainer.global_batch_size={spec.batch}", f"trainer.micro_batch_size={spec.batch}",
        f"trainer.lr={LR}", "eval.max_samples=0", "rollout.engine=hf",
        f"rollout.prompts_per_step={spec.batch // GROUP}",
        f"rollout.n_samples_per_prompt={GROUP}", f"rollout.max_new_tokens={EPISODE_TOKENS}",
        "rollout.temperature=1.0", "algorithm.estimator=grpo", "algorithm.kl_coef=0",
        "algorithm.ppo_epochs=1", "algorithm.loss_aggregation=token",
        f"environment.spec={ENV_FILE}:Adder", f"environment.max_turns={MAX_TURNS}",
        f"environment.max_episode_tokens={EPISODE_TOKENS}", *spec.align_extra])
    PPOTrainer(cfg, show_progress=False).fit()
    steps = [m for m in read_metrics(Path(spec.out) / "metrics.jsonl") if "step_seconds" in m]
    figures = summarise(spec.batch, [m["step_seconds"] for m in steps],
                        [m["time/generate"] for m in steps],
                        [m["episodes/turns_mean"] * spec.batch for m in steps],
                        [m["reward"] for m in steps],
                        [m["episodes/tool_calls"] for m in steps],
                        [m["episodes/tool_errors"] for m in steps])
    return {**figures, "on_malformed_call": cfg.environment.on_malformed_call}


def run_trl(spec: RunSpec) -> dict[str, float]:
    from agentic_env import Adder
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**{**trl_common_args(spec), "logging_steps": 1},
                      per_device_train_batch_size=spec.batch, learning_rate=LR,
                      num_generations=GROUP, max_completion_length=EPISODE_TOKENS,
                      max_tool_calling_iterations=MAX_TURNS - 1, temperature=1.0, beta=0.0,
                      loss_type="dapo", scale_rewards="group")
    trainer = GRPOTrainer(model=spec.model_dir, args=args, environment_factory=Adder,
                          train_dataset=load_dataset("json", data_files=spec.data)["train"],
                          processing_class=AutoTokenizer.from_pretrained(spec.model_dir))
    # Model turns: every sequence TRL hands to generation (first turns and post-tool turns);
    # rollout time: its whole `_generate` (turns, tool calls, parsing), as align's time/generate.
    generated, turns, rollout_seconds = {"turns": 0, "seconds": 0.0}, [], []
    generate_turn, generate = trainer._generate_single_turn, trainer._generate

    def counting(prompt_ids: list, *rest: Any, **kwargs: Any) -> Any:
        out = generate_turn(prompt_ids, *rest, **kwargs)
        generated["turns"] += len(out[0])
        return out

    def timed(prompts: list) -> Any:
        tick = time.perf_counter()
        out = generate(prompts)
        generated["seconds"] += time.perf_counter() - tick
        return out

    trainer._generate_single_turn, trainer._generate = counting, timed

    class TurnCount(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            turns.append(generated["turns"])
            rollout_seconds.append(generated["seconds"])
            generated.update(turns=0, seconds=0.0)

    trainer.add_callback(TurnCount())
    seconds = train_trl(trainer)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    calls = [h["tools/call_frequency"] for h in logs]
    errors = [h["tools/failure_frequency"] * c for h, c in zip(logs, calls)]
    return summarise(spec.batch, [0.0, *seconds], rollout_seconds, turns,
                     [h["reward"] for h in logs], calls, errors)


def summarise(episodes_per_step: int, step_seconds: list[float], rollout_seconds: list[float],
              turns: list[float], rewards: list[float], tool_calls: list[float],
              tool_errors: list[float]) -> dict[str, float]:
    """The child's JSON line from per-step records (step 1, with its warm-up, is not timed)."""
    timed = sum(step_seconds[1:])
    if len(step_seconds) < 2 or timed <= 0:
        raise RuntimeError("no timed steps: step 1 is not timed, run at least 2 steps")
    return {"samples_per_s": episodes_per_step * (len(step_seconds) - 1) / timed,
            "completions_per_s": sum(turns[1:]) / timed,
            "rollout_share": sum(rollout_seconds[1:]) / timed,
            "turns_per_episode": sum(turns) / (episodes_per_step * len(turns)),
            "tool_calls_per_episode": statistics.mean(tool_calls),
            "tool_errors_per_episode": statistics.mean(tool_errors),
            "reward_first": rewards[0], "reward_last": statistics.mean(rewards[-TAIL:])}


# ------------------------------------------------------------------ the comparison


def compare(steps: int, batch: int, repeats: int, sft_steps: int, model: str | None,
            ray_address: str | None, seed: int | None = None,
            malformed_calls: str = "end") -> dict[str, Any]:
    """Warm the model up once (unless `model` is given), then alternate align and TRL
    `repeats` times each."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = model or str(warm_up(folder, sft_steps))
        data = write_prompts(folder, steps * batch // GROUP)

        def spec_of(tool: str, r: int) -> RunSpec:
            return RunSpec(stage="agentic", model_dir=str(model), data=str(data),
                           out=str(folder / f"{tool}-{r}"), steps=steps, batch=batch,
                           max_length=PROMPT_TOKENS + EPISODE_TOKENS, ray_address=ray_address,
                           seed=seed, align_extra=[] if tool == "trl" else
                           [f"environment.on_malformed_call={malformed_calls}"])

        runs = alternate(__file__, TOOLS, repeats, spec_of, timeout_s=1800)
    line: dict[str, Any] = {"stage": "agentic", "steps": steps, "episodes_per_step": batch,
                            "repeats": repeats, "threads": os.cpu_count()}
    for tool, results in runs.items():
        for key in ("samples_per_s", "completions_per_s", "rollout_share", "turns_per_episode",
                    "tool_calls_per_episode", "tool_errors_per_episode", "reward_first",
                    "reward_last", "peak_rss_mb"):
            name = "episodes_per_s" if key == "samples_per_s" else key
            line[f"{tool}_{name}"] = round(statistics.median(x[key] for x in results), 3)
    line["ratio"] = round(line["align_episodes_per_s"] / line["trl_episodes_per_s"], 3)
    line["align_on_malformed_call"] = runs["align"][0]["on_malformed_call"]  # as the run had it
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=16, help="episodes per step")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool (A B A B)")
    parser.add_argument("--sft-steps", type=int, default=200, help="warm-up SFT steps")
    parser.add_argument("--model", help="a warmed-up model folder to start from (no SFT)")
    parser.add_argument("--quick", action="store_true",
                        help="3 steps, 8 episodes, 1 run each, 80 SFT steps (a smoke test)")
    parser.add_argument("--ray-address", help="align joins this Ray cluster (RSS leaves it out)")
    parser.add_argument("--seed", type=int,
                        help="both tools' seed (align's trainer.seed, TRL's seed); default 42")
    parser.add_argument("--malformed-calls", choices=("end", "respond"), default="end",
                        help="align's environment.on_malformed_call (end: as TRL, whose episode "
                             "ends at a call that does not parse)")
    add_child_flags(parser, TOOLS)
    args = parser.parse_args()
    if run_as_child(args, {"align": run_align, "trl": run_trl}):
        return
    if args.quick:
        args.steps, args.batch, args.repeats, args.sft_steps = 3, 8, 1, 80
    print(json.dumps(compare(args.steps, args.batch, args.repeats, args.sft_steps, args.model,
                             args.ray_address, args.seed, args.malformed_calls)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    main()
