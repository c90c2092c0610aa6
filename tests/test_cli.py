"""The command line: bad input exits 2 with one readable message and no traceback."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest

from align.cli import main


def run_align(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`align ARGS` in this process (as `align.cli.main` runs it): exit code and output."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_unknown_key_exits_2_and_suggests(tmp_path):
    """Through the real entry point, in a process of its own."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: out\n")
    result = subprocess.run([sys.executable, "-m", "align.cli", "sft", str(bad),
                             "trainer.lrr=1"], capture_output=True, text=True, timeout=120)
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
