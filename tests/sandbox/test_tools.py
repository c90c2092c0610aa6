"""The `python` tool as episodes use it: its schema, an episode through a real model family's
tool-call format (Qwen2.5's template as TRL ships it), the code's errors as text, and the
sandbox's failures as infrastructure errors."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from transformers.utils import get_json_schema

from align.errors import InfrastructureError
from align.sandbox import Sandbox, SandboxConfig, SandboxLimits, configure, take_metrics
from align.sandbox.tools import python
from tests.chat_models import chatml_tokenizer, trl_template
from tests.sandbox.conftest import Unavailable, needs_namespaces

pytestmark = needs_namespaces
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@pytest.fixture(autouse=True)
def quick_limits():
    configure(SandboxConfig(limits=SandboxLimits(timeout_s=1, max_output_bytes=200)))


def test_the_schema_comes_from_hints_and_docstring():
    schema = get_json_schema(python)["function"]
    assert schema["name"] == "python"
    assert schema["parameters"]["properties"]["code"]["type"] == "string"
    assert schema["parameters"]["required"] == ["code"]


def test_an_episode_calls_the_tool_and_reads_its_output():
    tokenizer = chatml_tokenizer("qwen2")
    tokenizer.chat_template = trl_template("qwen2_5")
    tools = {fn.__name__: fn for fn in [python]}
    messages = [{"role": "user", "content": "What is 6 * 7? Compute it."}]
    prompt = tokenizer.apply_chat_template(messages, tools=list(tools.values()),
                                           add_generation_prompt=True, tokenize=False)
    assert '"name": "python"' in prompt  # the schema reached the model
    # The model's turn, as the engine would sample it in Hermes/Qwen2.5 form.
    turn = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
    call = json.loads(TOOL_CALL.search(turn).group(1))
    output = tools[call["name"]](**call["arguments"])
    assert output == "42\n"
    messages += [{"role": "assistant", "content": "",
                  "tool_calls": [{"type": "function", "function": call}]},
                 {"role": "tool", "name": "python", "content": output}]
    rendered = tokenizer.apply_chat_template(messages, tools=list(tools.values()),
                                             add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n42\n\n</tool_response>" in rendered


def test_the_codes_errors_and_stops_go_back_to_the_model_as_text():
    assert python("1 / 0").endswith("ZeroDivisionError: division by zero\n[exit status 1]")
    assert python("import time\nprint('a', flush=True)\ntime.sleep(30)") == \
        "a\n[stopped: still running after 1 s]"
    assert python("print('x' * 1000)") == "x" * 200 + "\n[output cut at 200 bytes]"
    assert python("pass") == "[no output]"
    assert python("import os\nprint(os.environ.get('HF_TOKEN'))") == "None\n"


def test_tool_calls_of_concurrent_episodes_run_at_once():
    take_metrics()

    async def episodes() -> list[str]:
        return await asyncio.gather(*(asyncio.to_thread(python, f"print({n} * {n})")
                                      for n in range(6)))

    assert asyncio.run(episodes()) == [f"{n * n}\n" for n in range(6)]
    assert take_metrics()["sandbox/executions"] == 6


def test_a_sandbox_failure_is_an_infrastructure_error(monkeypatch):
    monkeypatch.setattr("align.sandbox.tools.default_sandbox",
                        lambda: Sandbox(executor=Unavailable()))
    with pytest.raises(InfrastructureError, match="the sandbox is unavailable"):
        python("print(1)")
