"""A reward model on its own: trained, evaluated, served over HTTP, then used as a reward.

    python recipes/reward_model_service.py --output-dir runs/rm_recipe [key=value ...]

1. SFT (the reward model's backbone starts from it).
2. `align rm`: a Bradley-Terry reward model on preference pairs.
3. `align eval-rm`: its pairwise accuracy on held-out pairs, in this process.
4. `align serve-rm`: the model behind the HTTP reward API on 127.0.0.1 (a free port).
5. PPO against the served model (`rewards: [http://127.0.0.1:PORT/score, ...]`), with the
   exact-match gold reward logged beside it; the server stops when the run ends.
The same server can score for any number of runs, or for another machine's (`--host`).
"""

from __future__ import annotations

import threading

from align.recipe import parse_args, run
from reward_models.server import RewardModelServer, evaluate_reward_model, format_report

RUNS = ("sft", "rm", "ppo_http")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/rm_recipe")
    out, extra = args.output_dir, dict(overrides=args.overrides, runs=RUNS, quiet=args.quiet)

    sft = run("sft", "arithmetic/sft.yaml", out / "sft", **extra)
    sft_model = f"model.name_or_path={out / 'sft' / 'final'}"
    run("rm", "arithmetic/rm.yaml", out / "rm", sft_model, **extra)

    report = evaluate_reward_model(out / "rm" / "final", "embedded")
    print(format_report(report))

    server = RewardModelServer(("127.0.0.1", 0), out / "rm" / "final")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ppo = run("ppo", "arithmetic/ppo_rm_anchored.yaml", out / "ppo_http", sft_model,
                  f"rewards.0.spec={server.url}", "rewards.0.kwargs={}", **extra)
    finally:
        server.shutdown()
        server.server_close()

    print(f"SFT        held-out exact match  {sft['eval/accuracy']:.1%}")
    print(f"RM         held-out pairwise     {report['accuracy']:.1%}")
    print(f"PPO(HTTP)  held-out exact match  {ppo['eval/accuracy']:.1%}")


if __name__ == "__main__":
    main()
