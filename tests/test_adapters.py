"""Framework adapters, each driven by its framework's own fake model: no network, no API key.

Every test runs the real policy worker (config/policy.yaml) in-process on fakeredis, so what the
model sees is what a real deployment would tell it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.items import ToolCallOutputItem
from agents.testing import ScriptedModel, assistant_message, function_call
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, ToolException, tool
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.toolsets import FunctionToolset

from sudo_queue import Gate, Status
from sudo_queue.adapters.langchain import gated_tool
from sudo_queue.adapters.openai_agents import gated_function_tool
from sudo_queue.adapters.pydantic_ai import gated_toolset
from sudo_queue.embedded import LocalStack, local_stack
from sudo_queue.store import Store

from .helpers import POLICY, ROOT

set_tracing_disabled(True)

# Each fake tool appends here when it really runs, so a test can prove a refused call did not.
ran: list[str] = []


@pytest.fixture(autouse=True)
def _reset_ran() -> None:
    ran.clear()


@pytest_asyncio.fixture
async def stack() -> AsyncIterator[LocalStack]:
    """fakeredis plus the policy worker, in this event loop."""
    async with local_stack(policy_path=POLICY, redis_server=None) as s:
        yield s


@pytest_asyncio.fixture
async def gate(stack: LocalStack) -> AsyncIterator[Gate]:
    async with stack.gate("billing-bot") as g:
        yield g


async def when_pending(store: Store, decide: Callable[[str], Awaitable[Any]]) -> None:
    """Play the human: decide the first request that turns pending."""
    async with asyncio.timeout(5):
        # A stand-in human checking the list, bounded by the timeout; not the gate's own path.
        while not (ids := await store.open_ids(Status.PENDING)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await decide(ids[0])


# -- LangChain -----------------------------------------------------------------------------------


@tool
async def charge_card(amount: int, customer: str) -> str:
    """Charge a customer's card; amount in USD."""
    ran.append(f"charge {amount}")
    return f"charged {amount} USD to {customer}"


@tool
async def drop_table(table: str) -> str:
    """Drop a database table."""
    ran.append(f"drop {table}")
    return f"dropped table {table}"


async def langchain_run(tools: list[BaseTool], calls: list[dict[str, Any]]) -> list[BaseMessage]:
    """LangChain's tool-calling loop with a fake chat model that makes `calls`, then answers."""
    model = GenericFakeChatModel(
        messages=iter([AIMessage(content="", tool_calls=calls), AIMessage(content="done")])
    )
    by_name = {t.name: t for t in tools}
    messages: list[BaseMessage] = [HumanMessage("go")]
    while True:
        reply = await model.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(await by_name[call["name"]].ainvoke(call))


def lc_call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


async def test_langchain_allows_and_denies(gate: Gate) -> None:
    """An allowed call runs; a denied one comes back as a status=error ToolMessage, not a crash."""
    tools = [
        gated_tool(charge_card, gate, resource="stripe", action="charge"),
        gated_tool(drop_table, gate, resource="postgres", action="drop_table"),
    ]
    messages = await langchain_run(
        tools,
        [
            lc_call("charge_card", {"amount": 20, "customer": "cus_1"}, "c1"),
            lc_call("drop_table", {"table": "users"}, "c2"),
        ],
    )
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [(m.tool_call_id, m.status) for m in results] == [("c1", "success"), ("c2", "error")]
    assert results[0].content == "charged 20 USD to cus_1"
    assert "postgres.drop_table" in results[1].content
    assert "denied by the policy (rule 'never-drop')" in results[1].content
    assert messages[-1].content == "done"  # the run went on to the model's answer
    assert ran == ["charge 20"]


async def test_langchain_waits_for_approval_then_runs(stack: LocalStack, gate: Gate) -> None:
    """A call that needs a human runs once it is approved, with the tool's own output."""
    tools = [gated_tool(charge_card, gate, resource="stripe", action="charge")]
    store = Store(stack.redis.client)
    approve = when_pending(store, lambda rid: store.approve(rid, actor="alice"))
    messages, _ = await asyncio.gather(
        langchain_run(tools, [lc_call("charge_card", {"amount": 5000, "customer": "c"}, "c1")]),
        approve,
    )
    result = next(m for m in messages if isinstance(m, ToolMessage))
    assert (result.status, result.content) == ("success", "charged 5000 USD to c")
    assert ran == ["charge 5000"]


async def test_langchain_rejection_reason_reaches_the_model(stack: LocalStack, gate: Gate) -> None:
    """A human's rejection and its reason reach the model as the tool's error message."""
    tools = [gated_tool(charge_card, gate, resource="stripe", action="charge")]
    store = Store(stack.redis.client)
    reject = when_pending(store, lambda rid: store.reject(rid, actor="bob", reason="card flagged"))
    messages, _ = await asyncio.gather(
        langchain_run(tools, [lc_call("charge_card", {"amount": 9000, "customer": "c"}, "c1")]),
        reject,
    )
    result = next(m for m in messages if isinstance(m, ToolMessage))
    assert result.status == "error"
    assert "rejected by bob (rule 'big-charges'): card flagged" in result.content
    assert ran == []


def test_langchain_gated_tool_looks_the_same_to_the_model() -> None:
    """The gated tool keeps the wrapped tool's name, description and argument schema."""
    wrapped = gated_tool(charge_card, gate=None, resource="stripe")  # type: ignore[arg-type]
    assert wrapped.name == charge_card.name
    assert wrapped.description == charge_card.description
    assert wrapped.tool_call_schema.model_json_schema() == (
        charge_card.tool_call_schema.model_json_schema()
    )


async def test_langchain_wrapped_tool_errors_keep_their_own_handling(gate: Gate) -> None:
    """A ToolException of the wrapped tool itself propagates or is handled as that tool says."""

    @tool
    async def flaky(amount: int) -> str:
        """Always fails."""
        raise ToolException("upstream down")

    raising = gated_tool(flaky, gate, resource="stripe", action="charge")
    with pytest.raises(ToolException, match="upstream down"):
        await raising.ainvoke(lc_call("flaky", {"amount": 1}, "c1"))

    flaky.handle_tool_error = True
    handled = gated_tool(flaky, gate, resource="stripe", action="charge")
    message = await handled.ainvoke(lc_call("flaky", {"amount": 1}, "c2"))
    assert message.content == "upstream down"


# -- OpenAI Agents SDK ---------------------------------------------------------------------------


@function_tool
async def oa_charge_card(amount: int, customer: str) -> str:
    """Charge a customer's card; amount in USD."""
    ran.append(f"charge {amount}")
    return f"charged {amount} USD to {customer}"


@function_tool
async def oa_drop_table(table: str) -> str:
    """Drop a database table."""
    ran.append(f"drop {table}")
    return f"dropped table {table}"


async def openai_run(gate: Gate, calls: list[Any]) -> list[str]:
    agent = Agent(
        name="billing-bot",
        instructions="help",
        model=ScriptedModel([calls, [assistant_message("done")]]),
        tools=[
            gated_function_tool(oa_charge_card, gate, resource="stripe", action="charge"),
            gated_function_tool(oa_drop_table, gate, resource="postgres", action="drop_table"),
        ],
    )
    result = await Runner.run(agent, "go")
    assert result.final_output == "done"  # the run went on to the model's answer
    return [str(i.output) for i in result.new_items if isinstance(i, ToolCallOutputItem)]


async def test_openai_agents_allows_and_denies(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed call runs; a denied one becomes the tool output the model reads, not a crash."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    outputs = await openai_run(
        gate,
        [
            function_call("oa_charge_card", {"amount": 20, "customer": "cus_1"}, call_id="c1"),
            function_call("oa_drop_table", {"table": "users"}, call_id="c2"),
        ],
    )
    assert outputs[0] == "charged 20 USD to cus_1"
    assert "denied by the policy (rule 'never-drop')" in outputs[1]
    assert ran == ["charge 20"]


async def test_openai_agents_unreadable_arguments_fail_closed(gate: Gate) -> None:
    """Arguments that are not a JSON object are refused before the gate, and nothing runs."""
    outputs = await openai_run(
        gate, [function_call("oa_drop_table", "not json at all", call_id="c1")]
    )
    assert outputs == [
        "Not run: the arguments of 'oa_drop_table' are not valid JSON "
        "(Expecting value: line 1 column 1 (char 0)); fix them."
    ]
    assert ran == []


# -- Pydantic AI ---------------------------------------------------------------------------------


async def pa_charge_card(amount: int, customer: str) -> str:
    """Charge a customer's card; amount in USD."""
    ran.append(f"charge {amount}")
    return f"charged {amount} USD to {customer}"


async def pa_drop_table(table: str) -> str:
    """Drop a database table."""
    ran.append(f"drop {table}")
    return f"dropped table {table}"


def scripted(calls: list[ToolCallPart]) -> FunctionModel:
    """Calls the tools once, then answers with the JSON of what the tools returned."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [
            {"tool": p.tool_name, "outcome": p.outcome, "content": p.content}
            for m in messages
            if isinstance(m, ModelRequest)
            for p in m.parts
            if isinstance(p, ToolReturnPart)
        ]
        if not returns:
            return ModelResponse(parts=list(calls))
        return ModelResponse(parts=[TextPart(json.dumps(returns))])

    return FunctionModel(respond)


CALLS = {"pa_charge_card": ("stripe", "charge"), "pa_drop_table": ("postgres", "drop_table")}


async def test_pydantic_ai_allows_and_denies(gate: Gate) -> None:
    """An allowed call runs; a denied one is a failed tool result the model reads, not a crash."""
    toolset = gated_toolset(FunctionToolset([pa_charge_card, pa_drop_table]), gate, calls=CALLS)
    model = scripted(
        [
            ToolCallPart("pa_charge_card", {"amount": 20, "customer": "cus_1"}, "c1"),
            ToolCallPart("pa_drop_table", {"table": "users"}, "c2"),
        ]
    )
    result = await PydanticAgent(model, toolsets=[toolset]).run("go")
    seen = json.loads(result.output)
    assert seen[0] == {
        "tool": "pa_charge_card",
        "outcome": "success",
        "content": "charged 20 USD to cus_1",
    }
    assert (seen[1]["tool"], seen[1]["outcome"]) == ("pa_drop_table", "failed")
    assert "denied by the policy (rule 'never-drop')" in seen[1]["content"]
    assert ran == ["charge 20"]


async def test_pydantic_ai_timeout_leaves_the_request_open(stack: LocalStack, gate: Gate) -> None:
    """No decision within `timeout`: the model hears it waits; the request stays pending."""
    toolset = gated_toolset(FunctionToolset([pa_charge_card]), gate, calls=CALLS, timeout=0.3)
    model = scripted([ToolCallPart("pa_charge_card", {"amount": 5000, "customer": "c"}, "c1")])
    result = await PydanticAgent(model, toolsets=[toolset]).run("go")
    (seen,) = json.loads(result.output)
    assert seen["outcome"] == "failed"
    assert "nobody decided the call stripe.charge" in seen["content"]
    assert "within 0.3s" in seen["content"]
    store = Store(stack.redis.client)
    assert len(await store.open_ids(Status.PENDING)) == 1
    assert ran == []


# -- the runnable examples -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "example", ["langchain_agent.py", "openai_agents_agent.py", "pydantic_ai_agent.py"]
)
def test_example_runs_offline(example: str, tmp_path: Any) -> None:
    """Each adapter example runs to the end with no API key, printing the allowed call's
    result and the denial message the model read."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        env=env,  # no OPENAI_API_KEY, no SUDO_QUEUE_*; no redis-server on PATH: in-memory Redis
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "charged 20 USD to cus_42" in result.stdout
    assert "Not run: the call postgres.drop_table" in result.stdout
    assert "denied by the policy (rule 'never-drop')" in result.stdout
