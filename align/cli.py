"""Command line: `align sft|rm|... CONFIG [key=value ...]`, `report`, `eval-rm`, `serve-rm`,
`quickstart`.

Every project error is printed as one message, without a traceback, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import AlignError, ConfigError, OutputDirError

if TYPE_CHECKING:
    from align.policy_sampling import EvalSettings


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    from align.trainers.registry import load_stage_config, run_stage

    cfg = load_stage_config(stage, args.config, args.overrides)
    summary = run_stage(stage, cfg, show_progress=not args.quiet)
    _print_summary(summary)
    return 0


def _run_quickstart(args: argparse.Namespace) -> int:
    from align.quickstart import run_quickstart

    run_quickstart(args.output_dir, args.configs, args.overrides, quiet=args.quiet)
    return 0


def _run_eval_rm(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from reward_models.server import evaluate_reward_model, format_report

    report = evaluate_reward_model(args.model, args.data, args.batch_size, args.max_length,
                                   args.split)
    print(format_report(report))
    try:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    except OSError as exc:
        raise OutputDirError(f"--output {args.output}: cannot write it: {exc}") from None
    print(f"written to {args.output}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from align.policy_eval import evaluate_policy, format_eval_report, samples_path

    report = evaluate_policy(args.model, args.data, args.reward or [], args.baseline,
                             _eval_settings(args), args.output)
    print(format_eval_report(report))
    print(f"written to {args.output} and {samples_path(Path(args.output))}")
    return 0


def _eval_settings(args: argparse.Namespace) -> EvalSettings:
    """`align eval`'s options as EvalSettings; episode budgets only with an environment."""
    from align.config import EnvironmentConfig
    from align.policy_sampling import ENVIRONMENT_OPTIONS, EvalSettings

    env = EnvironmentConfig(spec=args.environment, tools=args.tool or [])
    for name in ("max_turns", "max_tokens_per_turn", "max_episode_tokens"):
        value = getattr(args, name)
        if value is not None and not env.enabled:
            raise ConfigError(f"{ENVIRONMENT_OPTIONS[name]} sets a budget of episodes: give "
                              "--environment SPEC or --tool SPEC too")
        if value is not None:
            setattr(env, name, value)
    return EvalSettings(max_new_tokens=args.max_new_tokens,
                        greedy=not args.sample and args.samples_per_prompt == 1,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        batch_size=args.batch_size, max_samples=args.max_samples,
                        max_length=args.max_length, engine=args.engine, split=args.split,
                        samples_per_prompt=args.samples_per_prompt,
                        chat_template=args.chat_template, environment=env)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from align.report import load_run, write_report

    runs = [load_run(folder) for folder in args.runs]
    names = [run.name for run in runs]
    for i, run in enumerate(runs):  # two runs both called final/ stay apart
        if names.count(run.name) > 1:
            run.name = f"{run.folder.parent.name}-{run.name}-{i}"
    output = Path(args.output) if args.output else (
        runs[0].folder if len(runs) == 1 else Path("report"))
    path = write_report(runs, output, title=args.title)
    print(f"written to {path}")
    return 0


def _run_serve_rm(args: argparse.Namespace) -> int:
    from reward_models.server import TOKEN_ENV, RewardModelServer

    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        server = RewardModelServer((args.host, args.port), args.model, args.batch_size,
                                   token=token, max_samples=args.max_samples)
    except OSError as exc:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there: "
                          f"{exc}") from None
    openrlhf = server.url.replace("/score", "/get_reward")
    print(f"serving reward model {args.model} at {server.url} (OpenRLHF's protocol: "
          f"{openrlhf}; Ctrl-C stops)", flush=True)
    if not server.loopback_only and token is None:
        print(f"note: no token is set (--token or {TOKEN_ENV}); anyone who can reach this "
              "address can use the server", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


def build_parser() -> argparse.ArgumentParser:
    from align.trainers.registry import STAGES

    parser = argparse.ArgumentParser(prog="align", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"train the {stage} stage from a YAML config")
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-4")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(handler=lambda a, s=stage: _run_stage(s, a))
    q = sub.add_parser("quickstart", help="run the embedded task end to end")
    q.add_argument("--output-dir", default="runs/quickstart", help="where runs are written")
    q.add_argument("--configs", default=None,
                   help="folder of the arithmetic configs (default: the repository's)")
    q.add_argument("overrides", nargs="*",
                   help="key=value for every run, or RUN:key=value for one (e.g. "
                        "grpo:trainer.max_steps=20)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(handler=_run_quickstart)
    v = sub.add_parser("eval", help="generate with a trained policy, score it, compare it")
    v.add_argument("model", help="model or peft-adapter folder (e.g. runs/arithmetic/grpo/final)")
    v.add_argument("data", help="prompt rows {prompt, ...} (file, folder, hub name) or `embedded`")
    v.add_argument("--reward", action="append", metavar="SPEC",
                   help="a reward spec (repeatable); the first one decides the win rate")
    v.add_argument("--baseline", default=None, help="a model to compare with (win rate)")
    v.add_argument("--output", default="eval.json",
                   help="JSON report; samples go to OUTPUT.samples.jsonl beside it")
    v.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="generation engine")
    v.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    v.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    v.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --sample)")
    v.add_argument("--seed", type=int, default=0, help="sampling seed")
    v.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens per answer")
    v.add_argument("--batch-size", type=_positive_int, default=64, help="prompts per generate")
    v.add_argument("--max-samples", type=int, default=0, help="prompts evaluated (0: all)")
    v.add_argument("--max-length", type=_positive_int, default=1024,
                   help="longest prompt accepted, in tokens")
    v.add_argument("--split", default="train", help="split of a folder or hub dataset")
    v.add_argument("-k", "--samples-per-prompt", type=int, default=1, metavar="K",
                   help="samples of every prompt (above 1: sampling); reports mean@K and "
                        "pass@k for k = 1, 2, 4, ... K")
    v.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one, instead of MODEL's")
    v.add_argument("--environment", default=None, metavar="SPEC",
                   help="environment class, FILE.py:Class or module:Class: each sample is a "
                        "multi-turn episode (docs/eval.md)")
    v.add_argument("--tool", action="append", metavar="SPEC",
                   help="a tool function, FILE.py:fn or module:fn (repeatable)")
    v.add_argument("--max-turns", type=int, default=None,
                   help="model turns per episode (default 8)")
    v.add_argument("--max-tokens-per-turn", type=int, default=None,
                   help="new tokens of one model turn (default: --max-new-tokens)")
    v.add_argument("--max-episode-tokens", type=int, default=None,
                   help="tokens after the prompt, model and tool turns (default 1024)")
    v.set_defaults(handler=_run_eval)
    r = sub.add_parser("report", help="report.md with plots for one or more run folders")
    r.add_argument("runs", nargs="+", help="run folders (the output_dir of a stage)")
    r.add_argument("--output", default=None,
                   help="folder for report.md and plots/ (default: the run folder for one "
                        "run, ./report for several)")
    r.add_argument("--title", default="Report", help="the report's title")
    r.set_defaults(handler=_run_report)
    e = sub.add_parser("eval-rm", help="pairwise accuracy of a reward model on preference data")
    e.add_argument("model", help="reward-model folder (e.g. runs/arithmetic/rm/final)")
    e.add_argument("data", help="preference file, save_to_disk folder, hub name, or `embedded` "
                   "(the held-out pairs of the task settings in the run's config.yaml)")
    e.add_argument("--output", default="eval_rm.json", help="JSON report path")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="pairs per forward")
    e.add_argument("--max-length", type=_positive_int, default=None,
                   help="longest prompt + completion (default: the model's limit)")
    e.add_argument("--split", default="train", help="split of a folder or hub dataset")
    e.set_defaults(handler=_run_eval_rm)
    s = sub.add_parser("serve-rm", help="serve a reward model on the HTTP reward API")
    s.add_argument("model", help="reward-model folder (e.g. runs/arithmetic/rm/final)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per forward")
    s.add_argument("--max-samples", type=_positive_int, default=1024,
                   help="most samples one request may hold (more: HTTP 413)")
    s.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' (default: the "
                        "ALIGN_SERVE_RM_TOKEN environment variable; unset: no token)")
    s.set_defaults(handler=_run_serve_rm)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Hub access follows the user's HF_HUB_OFFLINE; an unreachable hub name fails at once
    # with what to do (align.hub), not after a minute of retries.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # say so, rather than have DeepSpeed warn about it
            os.environ["DS_ACCELERATOR"] = "cpu"
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`align sft c.yaml --quiet a.b=1`).
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except AlignError as exc:
        print(f"align: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("align: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
