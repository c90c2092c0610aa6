"""load_reward: one test per spec kind with expected numbers, and every load-time failure."""

from __future__ import annotations

import asyncio
import pickle
import textwrap
from pathlib import Path

import pytest

from align.errors import ConfigError, RewardError
from reward_models import LoadedReward, RewardSpec, load_reward

PROMPTS = ["Q: 23+58=", "Q: 1+2=", "Q: 99+99="]
COMPLETIONS = [" 81</s>", " 4", " 198"]
ANSWERS = ["81", "3", "198"]


def write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# --- one test per spec kind ----------------------------------------------------------------


def test_module_spec_scores_builtin():
    reward = load_reward("reward_models.builtin:exact_match")
    assert isinstance(reward, LoadedReward)
    assert reward.name == "exact_match"
    assert reward(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0]


def test_file_spec_relative_to_base_dir(tmp_path):
    write(
        tmp_path,
        "rules/mine.py",
        """
        def char_count(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
    """,
    )
    reward = load_reward("rules/mine.py:char_count", base_dir=tmp_path)
    assert reward.name == "char_count"
    assert reward(["a", "b"], ["xyz", ""]) == [3.0, 0.0]


def test_file_spec_absolute_path_and_pickle_reloads(tmp_path):
    path = write(
        tmp_path,
        "abs_reward.py",
        """
        def plus_one(prompts, completions, score):
            return [s + 1 for s in score]
    """,
    )
    reward = load_reward(f"{path}:plus_one")
    # a function that names its columns receives only those (no **kwargs needed)
    assert reward(["p", "q"], ["a", "b"], score=[1, 2], unrelated=["x", "y"]) == [2.0, 3.0]
    clone = pickle.loads(pickle.dumps(reward))  # travels as its spec, reloaded on arrival
    assert clone(["p"], ["a"], score=[5]) == [6.0]


def test_verl_style_prefix_per_sample_with_dict_score(tmp_path):
    write(
        tmp_path,
        "verl_rm.py",
        """
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            if data_source == "dict":
                return {"score": 0.5, "acc": True}
            bonus = extra_info["bonus"] if extra_info else 0.0
            return float(solution_str.strip() == ground_truth) + bonus
    """,
    )
    reward = load_reward("verl:verl_rm.py:compute_score", base_dir=tmp_path)
    assert reward.label == "verl:verl_rm.py:compute_score"  # the prefix was read as a style
    values = reward(
        ["p0", "p1", "p2"],
        [" 7", " 8", " 9"],
        data_source=["math", "math", "dict"],
        answer=["7", "7", "9"],  # ground_truth falls back to answer
        extra_info=[{"bonus": 0.25}, None, None],
    )
    assert values == [1.25, 0.0, 0.5]


def test_verl_style_mapping_form_without_extra_info(tmp_path):
    write(
        tmp_path,
        "old_verl.py",
        """
        def compute_score(data_source, solution_str, ground_truth):
            return 2.0 if solution_str == ground_truth else -1.0
    """,
    )
    reward = load_reward({"spec": "old_verl.py:compute_score", "style": "verl"}, tmp_path)
    assert reward(["a", "b"], ["x", "y"], ground_truth=["x", "x"]) == [2.0, -1.0]


def test_verl_style_kwargs_reach_var_keyword(tmp_path):
    write(
        tmp_path,
        "verl_kw.py",
        """
        def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
            return kwargs["scale"] * float(solution_str == ground_truth)
    """,
    )
    spec = {"spec": "verl:verl_kw.py:compute_score", "kwargs": {"scale": 3.0}}
    assert load_reward(spec, tmp_path)(["a", "b"], ["x", "y"], ground_truth=["x", "z"]) == [3, 0]


def test_verl_style_async_function(tmp_path):
    write(
        tmp_path,
        "verl_async.py",
        """
        import asyncio

        async def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            await asyncio.sleep(0.01)
            return {"score": float(solution_str == ground_truth)}
    """,
    )
    reward = load_reward("verl:verl_async.py:compute_score", base_dir=tmp_path)
    assert reward(["a", "b", "c"], ["1", "2", "3"], answer=["1", "0", "3"]) == [1.0, 0.0, 1.0]


def test_openrlhf_style_tensor_and_dict_returns(tmp_path):
    write(
        tmp_path,
        "orm.py",
        """
        import torch

        def reward_func(queries, prompts, labels):
            return torch.tensor([float(q == p + l) for q, p, l in zip(queries, prompts, labels)])

        def reward_dict(queries, prompts, labels):
            return {"rewards": [len(q) - len(p) for q, p in zip(queries, prompts)],
                    "scores": [0, 0], "extra_logs": {}}
    """,
    )
    tensor_reward = load_reward("openrlhf:orm.py:reward_func", base_dir=tmp_path)
    # labels come from `label`, falling back to `answer`
    assert tensor_reward(["1+1=", "2+2="], ["2", "5"], answer=["2", "4"]) == [1.0, 0.0]
    dict_reward = load_reward({"spec": "orm.py:reward_dict", "style": "openrlhf"}, tmp_path)
    assert dict_reward(["ab", "c"], ["xyz", ""], label=["l1", "l2"]) == [3.0, 0.0]


def test_async_function(tmp_path):
    write(
        tmp_path,
        "async_rm.py",
        """
        import asyncio

        async def slow_len(prompts, completions, **kwargs):
            await asyncio.sleep(0.01)
            return [float(len(c)) for c in completions]
    """,
    )
    reward = load_reward("async_rm.py:slow_len", base_dir=tmp_path)
    assert reward(["a", "b"], ["xy", "xyz"]) == [2.0, 3.0]

    async def inside_a_running_loop() -> list:
        # the sync entry point works from async code too (the coroutine runs on its own loop)
        return reward(["a"], ["abcd"])

    assert asyncio.run(inside_a_running_loop()) == [4.0]


def test_kwargs_bound_like_partial():
    reward = load_reward(
        {
            "spec": "reward_models.builtin:length_penalty",
            "kwargs": {"target_chars": 2, "per_char": 0.5},
        }
    )
    assert reward(["p", "p"], ["ab", "abcde"]) == [0.0, -1.5]


def test_url_spec_builds_http_client_with_options():
    reward = load_reward({"spec": "http://127.0.0.1:9/score", "kwargs": {"timeout_s": 2}})
    assert reward.name == "127.0.0.1"
    assert reward.fn.timeout_s == 2 and reward.fn.max_tries == 3


def test_folder_without_config_json_is_not_a_reward_model(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RewardError, match=r"'run'.*not a reward model \(no config.json\)"):
        load_reward("run", base_dir=tmp_path)


def test_folder_with_a_model_that_is_no_reward_model_is_refused(tmp_path):
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_labels": 3}')
    with pytest.raises(RewardError, match=r"'final'"):
        load_reward("final", base_dir=tmp_path)


# --- load-time failures: ConfigError naming the spec ---------------------------------------


def test_missing_module():
    with pytest.raises(ConfigError, match=r"'no_such_pkg\.rules:fn'.*no module named 'no_such_pkg"):
        load_reward("no_such_pkg.rules:fn")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"'missing\.py:fn'.*does not exist"):
        load_reward("missing.py:fn", base_dir=tmp_path)


def test_missing_function_suggests_close_name():
    with pytest.raises(
        ConfigError, match=r"'reward_models.builtin:exact_mach'.*did you mean 'exact_match'"
    ):
        load_reward("reward_models.builtin:exact_mach")


def test_not_callable():
    with pytest.raises(ConfigError, match=r"'reward_models.builtin:EOS_MARKERS'.*not a function"):
        load_reward("reward_models.builtin:EOS_MARKERS")


def test_file_that_fails_to_execute(tmp_path):
    write(tmp_path, "broken.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError, match=r"'broken\.py:fn'.*RuntimeError: boom at import"):
        load_reward("broken.py:fn", base_dir=tmp_path)


@pytest.mark.parametrize(
    ("style", "source", "expected"),
    [
        ("verl", "def f(text):\n    return 1.0\n", "veRL-style reward must accept"),
        ("openrlhf", "def f(queries):\n    return [1.0]\n", "OpenRLHF-style reward must accept"),
        (None, "def f(samples, outputs):\n    return [1.0]\n", "must accept fn\\(prompts"),
    ],
)
def test_wrong_signature_for_style(tmp_path, style, source, expected):
    write(tmp_path, "sig.py", source)
    spec = f"{style}:sig.py:f" if style else "sig.py:f"
    with pytest.raises(ConfigError, match=rf"'{spec}'.*{expected}"):
        load_reward(spec, base_dir=tmp_path)


def test_unknown_kwarg_is_named():
    spec = {"spec": "reward_models.builtin:format_reward", "kwargs": {"max_digit": 2}}
    with pytest.raises(ConfigError, match=r"format_reward'.*'max_digit'.*mean 'max_digits'"):
        load_reward(spec)


def test_bad_mapping_key_and_style():
    with pytest.raises(ConfigError, match=r"unknown key 'wieght'; did you mean 'weight'"):
        RewardSpec.coerce({"spec": "m:f", "wieght": 2}, where="rewards[0]")
    with pytest.raises(ConfigError, match=r"'m:f'.*unknown style 'deepspeed'"):
        RewardSpec("m:f", style="deepspeed")
    with pytest.raises(ConfigError, match=r"'verl:http://h/x'.*applies to functions"):
        load_reward("verl:http://h/x")


def test_unrecognised_spec():
    with pytest.raises(ConfigError, match=r"'not-a-spec'.*cannot tell what this is"):
        load_reward("not-a-spec")


def test_style_prefix_only_before_a_full_target():
    assert RewardSpec("verl:compute").style is None  # a module called verl, not a style
    assert RewardSpec("verl:pkg.mod:fn") == RewardSpec("pkg.mod:fn", style="verl")


def test_config_reward_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    """A run's relative reward file resolves against the current directory, as `data.train`
    and `output_dir` do, not against the folder of the config file."""
    from align.config import PPOConfig, load_config
    from align.model_loading import load_tokenizer
    from align.trainers.ppo import PPOTrainer

    source = "def score(prompts, completions, **kw):\n    return [{}] * len(completions)\n"
    write(tmp_path / "work", "rewards/r.py", source.format(1.0))
    write(tmp_path / "configs", "rewards/r.py", source.format(2.0))
    config = write(tmp_path / "configs", "ppo.yaml", "rewards: [{spec: rewards/r.py:score}]\n"
                   "task: {num_train: 64, num_eval: 4}\n")
    monkeypatch.chdir(tmp_path / "work")
    trainer = PPOTrainer(load_config(PPOConfig, config))
    trainer.tokenizer = load_tokenizer(trainer.cfg.model)
    trainer.prepare_data()
    assert trainer.rewards(["Q: 1+1="], [" 2"]) == [1.0]
