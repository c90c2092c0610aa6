"""Bad input: every case exits 2 with a message naming its cause, and a checkpoint already in the
output folder is left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from align.cli import main
from align.config import dump_config
from tests.conftest import TINY, tiny_ppo_config, tiny_sft_config

TINY_MODEL = [f"model.embedded.hidden_size={TINY['hidden_size']}",
              f"model.embedded.num_heads={TINY['num_heads']}",
              f"model.embedded.intermediate_size={TINY['intermediate_size']}"]


def folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture()
def workspace(tmp_path):
    """A config file and an output folder holding a previous run's checkpoint."""
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (ckpt / "weights.bin").write_bytes(b"\x00" * 64)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {out}\n")
    return tmp_path, config, out


def rows(tmp: Path, name: str, lines: list[str]) -> str:
    return write(tmp / name, "\n".join(lines) + "\n")


def sft_cases(tmp: Path, tokenizer_dir: Path, model_dir: str) -> dict[str, tuple[list, str]]:
    good = json.dumps({"prompt": "Q: 1+2=", "completion": " 3"})
    no_completion = json.dumps({"prompt": "Q"})
    number = json.dumps({"prompt": "Q", "completion": 5})
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo"}]})
    return {
        "malformed JSONL line": ([f"data.train={rows(tmp, 'a.jsonl', [good, '{oops'])}"],
                                 "line 2"),
        "missing column": ([f"data.train={rows(tmp, 'b.jsonl', [no_completion])}"], "row 1"),
        "empty dataset": ([f"data.train={write(tmp / 'c.jsonl', '')}"], "c.jsonl"),
        "wrong value type": ([f"data.train={rows(tmp, 'd.jsonl', [number])}"], "'completion'"),
        "prompt longer than the limit": (
            [f"data.train={rows(tmp, 'e.jsonl', [good])}", "data.max_length=4"],
            "data.max_length=4"),
        "messages without a chat template": (
            [f"data.train={rows(tmp, 'f.jsonl', [chat])}", f"model.name_or_path={model_dir}",
             f"model.tokenizer={tokenizer_dir}"], "chat template"),
        "unknown config key": (["trainer.lrr=1"], "did you mean 'trainer.lr'"),
        "wrong type": (["trainer.max_steps=many"], "trainer.max_steps"),
        "missing model path": ([f"model.name_or_path={tmp / 'no-model'}"], "no-model"),
        "LoRA targets that match nothing": (
            ["model.lora.enabled=true", "model.lora.target_modules=[nothing_here]"],
            "target_modules"),
        "batch larger than the data": (
            [f"data.train={rows(tmp, 'g.jsonl', [good] * 3)}", "trainer.global_batch_size=8",
             "trainer.micro_batch_size=8"], "global_batch_size"),
    }


def ppo_cases(tmp: Path) -> dict[str, tuple[list, str]]:
    wrong_sig = write(tmp / "sig.py", "def score(x):\n    return [1.0]\n")
    return {
        "missing reward file": (
            [f"rewards=[{{spec: '{tmp / 'absent.py'}:fn'}}]"], "absent.py"),
        "reward with the wrong signature": (
            [f"rewards=[{{spec: '{wrong_sig}:score'}}]"], "sig.py"),
        "no reward at all": (["rewards=[]"], "rewards"),
    }


def check_case(stage: str, overrides: list[str], needle: str, config: Path, out: Path,
               capsys) -> None:
    before = folder_digest(out)
    code = main([stage, str(config), "--quiet", *TINY_MODEL, *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err
    assert folder_digest(out) == before, "a failed run changed the output folder"


def test_sft_bad_inputs(workspace, saved_tokenizer, tiny_model_dir, capsys):
    tmp, config, out = workspace
    cases = sft_cases(tmp, saved_tokenizer, tiny_model_dir("llama"))
    for name, (overrides, needle) in cases.items():
        try:
            check_case("sft", overrides, needle, config, out, capsys)
        except AssertionError as exc:
            raise AssertionError(f"case '{name}': {exc}") from None


def test_ppo_bad_reward_specs(workspace, capsys):
    tmp, config, out = workspace
    for name, (overrides, needle) in ppo_cases(tmp).items():
        try:
            check_case("ppo", ["task.num_train=50", *overrides], needle, config, out, capsys)
        except AssertionError as exc:
            raise AssertionError(f"case '{name}': {exc}") from None


def test_non_empty_output_dir_is_refused(workspace, capsys):
    _, config, out = workspace
    check_case("sft", [], "not empty", config, out, capsys)


@pytest.mark.slow
def test_runtime_reward_failures_keep_the_checkpoint(tmp_path, ray_local, capsys):
    """Rewards that fail only when called (wrong length, NaN, unreachable URL) stop a resumed
    run with exit 2; the checkpoint it resumed from is intact."""
    cfg = tiny_ppo_config(tmp_path, "trainer.max_steps=1", "eval.max_samples=0")
    first = tmp_path / "first.yaml"
    dump_config(cfg, first)
    assert main(["ppo", str(first), "--quiet"]) == 0
    capsys.readouterr()
    bad = write(tmp_path / "bad.py", "def short(prompts, completions, **kw):\n"
                "    return [1.0] * (len(completions) - 1)\n"
                "def nan(prompts, completions, **kw):\n"
                "    return [float('nan')] * len(completions)\n")
    cases = {
        "wrong length": ([f"rewards=[{{spec: '{bad}:short'}}]"], "bad.py:short"),
        "NaN reward": ([f"rewards=[{{spec: '{bad}:nan'}}]"], "bad.py:nan"),
        "unreachable URL": (["rewards=[{spec: 'http://127.0.0.1:9/score', "
                             "kwargs: {max_tries: 1, timeout_s: 2}}]"], "127.0.0.1:9"),
    }
    for name, (overrides, needle) in cases.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(cfg.output_dir, run)
        before = folder_digest(run / "checkpoints")
        code = main(["ppo", str(first), "--quiet", f"output_dir={run}", "resume=auto",
                     "trainer.max_steps=2", *overrides])
        err = capsys.readouterr().err
        assert code == 2, f"{name}: {err}"
        assert needle in err, f"{name}: {err}"
        assert folder_digest(run / "checkpoints") == before, name


@pytest.mark.slow
def test_non_finite_loss_stops_before_a_bad_checkpoint(tmp_path, ray_local, capsys):
    cfg = tiny_sft_config(tmp_path, "trainer.lr=1e30", "trainer.max_steps=6",
                          "trainer.save_every=1", "eval.exact_match=false")
    config = tmp_path / "sft.yaml"
    dump_config(cfg, config)
    code = main(["sft", str(config), "--quiet"])
    err = capsys.readouterr().err
    # The first bad number stops it: a loss on a worker, or the gradient norm on the driver.
    assert code == 2 and ("non-finite loss" in err or "grad_norm is nan" in err), err
    steps = sorted(int(p.name.split("-")[1])
                   for p in (Path(cfg.output_dir) / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 6  # nothing written after the loss went bad
    assert not (Path(cfg.output_dir) / "final").exists()
