"""The shared driver loop's guard: a non-finite loss, value loss, gradient norm or reward stops
the run before a checkpoint is written."""

from __future__ import annotations

import pytest

from align.errors import TrainingError
from align.trainers.base import _check_finite


@pytest.mark.parametrize("key", ["loss", "policy_loss", "value_loss", "grad_norm", "reward"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_training_metric_stops_the_run(key, value):
    with pytest.raises(TrainingError, match=rf"step 3: {key} is"):
        _check_finite({"entropy": 0.5, key: value}, step=3)


def test_finite_metrics_and_other_keys_pass():
    _check_finite({"loss": 1.0, "grad_norm": 0.0, "clip_ratio": float("nan")}, step=1)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "occurrence"), [
    ("init_distributed", 1),  # inside the reward model's WorkerGroup.__init__
    ("load", 1),  # the reward model's actors started, loading it
    ("init_distributed", 2),  # inside the policy's WorkerGroup.__init__
    ("setup", 1),  # build_workers: the policy's actors building their model
])
def test_ctrl_c_during_set_up_leaves_no_actor_or_placement_group(
        tmp_path, ray_local, monkeypatch, tiny_reward_model_dir, method, occurrence):
    from align.distributed import WorkerGroup
    from align.trainers.ppo import PPOTrainer
    from tests.conftest import tiny_ppo_config
    from tests.distributed.test_worker_group import live_actors_and_groups, wait_until_released

    cfg = tiny_ppo_config(tmp_path, f"rewards=[{{spec: '{tiny_reward_model_dir}', "
                                    "kwargs: {num_workers: 1, cpus_per_worker: 0.5}}]")
    original, seen = WorkerGroup.call, []

    def call(self, name, *args, **kwargs):
        seen.append(name)
        if name == method and seen.count(name) == occurrence:
            for actor in self.actors:  # the call is under way when Ctrl-C arrives
                getattr(actor, name).remote(*args, **kwargs)
            raise KeyboardInterrupt
        return original(self, name, *args, **kwargs)

    before = live_actors_and_groups()
    monkeypatch.setattr(WorkerGroup, "call", call)
    with pytest.raises(KeyboardInterrupt):
        PPOTrainer(cfg, show_progress=False).fit()
    assert wait_until_released(before) == (set(), set())


@pytest.mark.slow
def test_a_hanging_reward_ends_the_run_within_its_timeout(tmp_path, ray_local, capsys):
    import time

    from align.cli import main
    from align.config import dump_config
    from tests.conftest import tiny_ppo_config

    called = tmp_path / "called"
    hang = tmp_path / "hang.py"
    hang.write_text("import time\n"
                    "def score(prompts, completions, **kw):\n"
                    f"    open({str(called)!r}, 'w').write(str(time.time()))\n"
                    "    time.sleep(600)\n")
    cfg = tiny_ppo_config(tmp_path, f"rewards=[{{spec: '{hang}:score', timeout_s: 2}}]")
    config = tmp_path / "ppo.yaml"
    dump_config(cfg, config)
    assert main(["ppo", str(config), "--quiet"]) == 2
    ended = time.time()
    err = capsys.readouterr().err
    assert "hang.py:score' did not return within timeout_s=2.0 s" in err, err
    assert ended - float(called.read_text()) < 2 + 10  # the timeout, and the workers' shutdown
