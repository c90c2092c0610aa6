"""docs/config.md is generated from the schema and must not go stale."""

from __future__ import annotations

import dataclasses

from align.config import TrainerConfig
from align.config_reference import DOC_PATH, field_comments, render


def test_the_config_reference_is_up_to_date():
    assert DOC_PATH.read_text() == render(), (
        "docs/config.md is stale: run `python -m align.config_reference --write`")


def test_every_field_has_its_comment_in_the_reference():
    comments = field_comments(TrainerConfig)
    assert comments["lr"] == "peak learning rate"
    text = render()
    for f in dataclasses.fields(TrainerConfig):
        assert f"| `trainer.{f.name}` |" in text
        assert comments.get(f.name), f"trainer.{f.name} has no comment in align/config.py"


def test_every_key_of_every_stage_has_a_comment():
    import typing

    from align.config_reference import sections
    from align.trainers.registry import STAGES

    missing = []
    for entry in STAGES.values():
        for prefix, cls in sections(entry.config_class):
            hints, comments = typing.get_type_hints(cls), field_comments(cls)
            missing += [f"{prefix}{f.name}" for f in dataclasses.fields(cls)
                        if not dataclasses.is_dataclass(hints[f.name]) and not comments.get(f.name)]
    assert not missing, f"config keys without a one-line comment: {sorted(set(missing))}"
