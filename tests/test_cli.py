"""The command line: bad input exits 2 with one readable message and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_align(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_unknown_key_exits_2_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: out\n")
    result = run_align("sft", str(bad), "trainer.lrr=1")
    assert result.returncode == 2
    assert "'trainer.lrr'" in result.stderr
    assert "did you mean 'trainer.lr'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["sft", "missing.yaml"], "not found"),
    (["sft", "{cfg}", "trainer.max_steps=abc"], "trainer.max_steps"),
    (["sft", "{cfg}", "model.name_or_path=./no-such-model"], "no-such-model"),
    (["sft", "{cfg}", "data.train=./nothing.jsonl"], "nothing.jsonl"),
])
def test_bad_input_exits_2(tmp_path, args, needle):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\n")
    result = run_align(*[a.format(cfg=cfg) for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "bad input must not create outputs"
