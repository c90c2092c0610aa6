"""The config reference (`docs/config.md`), generated from the schema in `align.config`.

Every field's default and its one-line comment come from the dataclasses themselves, so the
page cannot drift from the code: `tests/test_config_reference.py` fails when the file is stale.
Regenerate it with `python -m align.config_reference --write`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
import typing
from pathlib import Path
from typing import Any

from align import config as schema
from align.trainers.registry import STAGES

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
HEADER = """# Config reference

Generated from `align/config.py` by `python -m align.config_reference --write`; a test fails
when this page is stale. Every key can be set in the YAML file or on the command line as a
dotted override (`trainer.lr=3e-4`). Sections shared by every stage come first, then the
sections of each stage.
"""


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line in the source of the class that defines it."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update(_own_comments(base))
    return comments


def _own_comments(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    pending: str | None = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and pending is None:
            pending = token.string
        elif token.type == tokenize.COMMENT and pending is not None:
            comments[pending] = token.string.lstrip("# ").strip()
        elif token.type == tokenize.NEWLINE:
            pending = None
    return comments


def section_table(cls: type, prefix: str, skip: type | None = None) -> list[str]:
    """Markdown rows `| key | type | default | meaning |` of the scalar fields of `cls`, less
    those `skip` has with the same default (a stage's own fields only)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    inherited = ({f.name: _default(f) for f in dataclasses.fields(skip)} if skip else {})
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        if f.name in inherited and inherited[f.name] == _default(f):
            continue
        default = _default(f)
        rows.append(f"| `{prefix}{f.name}` | {_type(hints[f.name])} | `{default}` | "
                    f"{comments.get(f.name, '').replace('|', '/')} |")
    return rows


def sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of `cls` and every nested section, depth first."""
    hints = typing.get_type_hints(cls)
    found = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += sections(hints[f.name], f"{prefix}{f.name}.")
    return found


def render() -> str:
    """The whole reference page."""
    lines = [HEADER]
    shared = {p for p, _ in sections(schema.RunConfig)}
    lines += _block("Every stage", sections(schema.RunConfig))
    for stage, entry in STAGES.items():
        own = [(p, c) for p, c in sections(entry.config_class) if p not in shared or not p]
        lines += _block(f"`align {stage}`", own, top_label=f"top level of {stage}")
    return "\n".join(lines).rstrip() + "\n"


def _block(title: str, found: list[tuple[str, type]], top_label: str = "top level") -> list[str]:
    lines = [f"## {title}", ""]
    for prefix, cls in found:
        rows = section_table(cls, prefix, skip=schema.RunConfig if top_label != "top level"
                             and not prefix else None)
        if not rows:
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        if doc.startswith(cls.__name__ + "("):  # dataclasses' generated signature
            doc = ""
        lines += [f"### {prefix.rstrip('.') or top_label}", ""]
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    return lines


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "required"


def _type(tp: Any) -> str:
    text = re.sub(r"typing\.", "", str(tp)) if not isinstance(tp, type) else tp.__name__
    return text.replace("|", "or").replace("NoneType", "None")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write or check docs/config.md")
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    args = parser.parse_args()
    text = render()
    if args.write:
        DOC_PATH.write_text(text)
        print(f"written to {DOC_PATH}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
