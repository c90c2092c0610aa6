"""A reward model trained with `align rm`, served by `align serve-rm` on 127.0.0.1 and scored
through an OpenRLHF-protocol reward spec: the model's own numbers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from align.trainers.reward import RewardTrainer
from reward_models import load_reward
from reward_models.reward_model import load_reward_model, score_texts
from tests.conftest import tiny_rm_config
from tests.reward_models.test_serve_rm import STARTUP_TIMEOUT_S, first_line

pytestmark = pytest.mark.slow
PROMPTS = ["Q: 23+58=", "Q: 10+10=", "Q: 7+5="]
COMPLETIONS = [" 81", " 21", " 12"]


def test_openrlhf_spec_scores_through_serve_rm(tmp_path, ray_local, monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    cfg = tiny_rm_config(tmp_path, "trainer.max_steps=4", "task.num_pairs=256",
                         "task.num_eval=8")
    RewardTrainer(cfg, show_progress=False).fit()
    final = str(tmp_path / "run" / "final")
    model, tokenizer = load_reward_model(final)
    direct = score_texts(model, tokenizer, PROMPTS, COMPLETIONS)

    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve-rm", final, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = first_line(proc, timeout_s=STARTUP_TIMEOUT_S)
        url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/score
        openrlhf = load_reward({"spec": f"openrlhf:{url.replace('/score', '/get_reward')}",
                                "kwargs": {"max_tries": 1}})
        got = openrlhf(PROMPTS, COMPLETIONS, answer=["81", "20", "12"])
        assert got == pytest.approx(direct, abs=1e-5)
        assert max(got) - min(got) > 1e-3  # the samples are told apart
        ours = load_reward({"spec": url, "kwargs": {"max_tries": 1}})
        assert ours(PROMPTS, COMPLETIONS) == pytest.approx(got, abs=1e-6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
