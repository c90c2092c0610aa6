"""Judging a completion's code against a row's tests in the sandbox: what
``reward_models.builtin:code_tests`` does.

The code is the completion's last fenced block (```python ... ```, any tag or none); a
completion with no opening fence is taken up to its first closing fence (the continuation of a
prompt that opened one), else whole. The tests come in the forms code datasets use:

- **assert statements**: a list of strings (MBPP's ``test_list``), or one string of Python
  (each top-level ``assert`` is one test; other statements run in order as set-up). They run
  after the code, in its namespace (``__name__`` is ``"solution"``, so a ``__main__`` block
  does not run), in one execution; a test passes when it raises nothing.
- **stdin/stdout cases**: ``{"inputs": [...], "outputs": [...]}`` (APPS, TACO, DeepCoder;
  also as a JSON string, and with singular keys) or a list of ``{"input", "output"}``: the
  code runs once per case with the input on stdin, and passes when it exits 0 and prints the
  expected output, compared token by token (whitespace and line breaks aside).
- **call cases**: the same mapping with ``fn_name`` (APPS's call-based problems): the function
  is called with each input's arguments and must return the output (or the output's only
  element, as APPS stores it).

The score is the fraction of tests passed. The harness marks each passed test on stdout with
a fresh random token, so printing cannot fake a pass, nor can exiting early; the code runs in
the harness's own process, though, and could read the token from the harness file: judge
with separate executions (stdin/stdout cases) where that matters.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from align.sandbox.sandbox import Job, Sandbox

SOLUTION = "solution.py"
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)

# Runs the solution file, then each test in its namespace; `{token} {index}` marks a pass.
_HARNESS = '''import json
_TOKEN = {token!r}
_TESTS = json.loads({tests!r})
_namespace = {{"__name__": "solution"}}
with open({solution!r}) as _file:
    _source = _file.read()
exec(compile(_source, {solution!r}, "exec"), _namespace)


def _call(name, args, expected):
    result = _namespace[name](*args)
    if isinstance(result, tuple):
        result = list(result)
    return result == expected or [result] == expected


_namespace["_call"] = _call
for _index, _test in enumerate(_TESTS):
    try:
        exec(compile(_test, "test_%d" % _index, "exec"), _namespace)
    except BaseException:
        if _test.lstrip().startswith("assert"):
            continue
        break  # a set-up statement failed: the tests after it cannot pass
    else:
        if _test.lstrip().startswith("assert"):
            print("\\n%s %d" % (_TOKEN, _index), flush=True)
'''


def extract_code(text: str) -> str:
    """The code of a completion (see the module docstring)."""
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1]
    return text.split("```", 1)[0]


@dataclass(frozen=True)
class TestCases:
    """A row's tests in one of two shapes: statements run after the code (``statements``, of
    which ``asserts`` count), or stdin/expected-stdout pairs (``io``)."""

    statements: tuple[str, ...] = ()
    io: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        return len(self.io) if self.io else sum(_is_assert(s) for s in self.statements)


def parse_tests(tests: Any) -> TestCases | None:
    """A row's ``tests`` value as TestCases; None when it holds none.

    Raises:
        ValueError: For a value of no known shape (the message shows it).
    """
    if tests is None:
        return None
    if isinstance(tests, str) and tests.strip()[:1] in ("{", "["):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            pass  # Python code that starts with a bracket
    if isinstance(tests, str):
        return TestCases(statements=_split_statements(tests)) if tests.strip() else None
    if isinstance(tests, dict):
        return _cases_from_mapping(tests)
    if isinstance(tests, (list, tuple)):
        if not tests:
            return None
        if all(isinstance(t, str) for t in tests):
            return TestCases(statements=tuple(tests))
        if all(isinstance(t, dict) for t in tests):
            return _cases_from_mapping({"inputs": [_field(t, "input") for t in tests],
                                        "outputs": [_field(t, "output") for t in tests]})
    raise ValueError(f"tests of an unknown shape: {str(tests)[:120]!r}; expected assert "
                     "statements, or {'inputs': [...], 'outputs': [...]}")


def _field(case: dict, name: str) -> Any:
    for key in (name, name + "s"):
        if key in case:
            return case[key]
    raise ValueError(f"a test case without {name!r}: {str(case)[:120]!r}")


def _cases_from_mapping(tests: dict) -> TestCases:
    inputs, outputs = _field(tests, "input"), _field(tests, "output")
    if len(inputs) != len(outputs):
        raise ValueError(f"tests have {len(inputs)} inputs but {len(outputs)} outputs")
    name = tests.get("fn_name")
    if name:
        return TestCases(statements=tuple(
            f"assert _call({name!r}, {_literal(args)}, {_literal(out)})"
            for args, out in zip(inputs, outputs)))
    return TestCases(io=tuple((_text(i), _text(o)) for i, o in zip(inputs, outputs)))


def _literal(value: Any) -> str:
    return f"__import__('json').loads({json.dumps(value)!r})"


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _split_statements(code: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return (code,)  # runs as one statement and fails, as the dataset's test would
    lines = code.splitlines(keepends=True)
    return tuple("".join(lines[node.lineno - 1:node.end_lineno]) for node in tree.body)


def _is_assert(statement: str) -> bool:
    return statement.lstrip().startswith("assert")


def jobs_for(code: str, cases: TestCases) -> tuple[list[Job], str]:
    """The executions that judge ``code``, and the pass token of the harness (if any)."""
    if cases.io:
        return [Job(code=code, stdin=given) for given, _ in cases.io], ""
    token = secrets.token_hex(16)
    harness = _HARNESS.format(token=token, tests=json.dumps(list(cases.statements)),
                              solution=SOLUTION)
    return [Job(code=harness, files={SOLUTION: code})], token


def passed_tests(cases: TestCases, results: Sequence[Any], token: str) -> int:
    """How many of ``cases`` the execution ``results`` (from ``jobs_for``) passed."""
    if cases.io:
        return sum(result.ok and result.stdout.split() == expected.split()
                   for result, (_, expected) in zip(results, cases.io))
    marked = {line.split()[1] for line in results[0].stdout.splitlines()
              if line.startswith(token + " ") and len(line.split()) == 2}
    return sum(str(i) in marked for i, s in enumerate(cases.statements) if _is_assert(s))


def score_rows(sandbox: Sandbox, codes: Sequence[str], tests: Sequence[Any],
               all_or_nothing: bool = False) -> list[float | None]:
    """The fraction of each row's tests its code passes (1.0/0.0 with ``all_or_nothing``);
    None for a row without tests. Every execution of the batch runs through ``sandbox``,
    ``max_concurrent`` at once.

    Raises:
        SandboxError: When the sandbox fails (not the code): the batch has no fair score.
        ValueError: For a row whose tests have no known shape (naming the row).
    """
    plans = []
    for row, (code, raw) in enumerate(zip(codes, tests)):
        try:
            cases = parse_tests(raw)
        except ValueError as err:
            raise ValueError(f"row {row}: {err}") from None
        plans.append((cases, *jobs_for(code, cases)) if cases and cases.count else None)
    jobs = [job for plan in plans if plan for job in plan[1]]
    results = iter(sandbox.run_many(jobs))
    scores: list[float | None] = []
    for plan in plans:
        if plan is None:
            scores.append(None)
            continue
        cases, row_jobs, token = plan
        passed = passed_tests(cases, [next(results) for _ in row_jobs], token)
        fraction = passed / cases.count
        scores.append(float(fraction == 1.0) if all_or_nothing else fraction)
    return scores
