"""OpenAI Agents SDK: a function tool that asks sudo-queue before each call.

```python
from agents import Agent, function_tool
from sudo_queue.adapters.openai_agents import gated_function_tool

@function_tool
async def charge_card(amount: int, customer: str) -> str: ...

agent = Agent(name="billing", tools=[gated_function_tool(charge_card, gate, resource="stripe",
                                                         action="charge")])
```

The gated tool is the same `FunctionTool` (name, description, JSON schema, guardrails) with its
invoker wrapped: each call first goes through `gate.request(resource, action, args)` with the
arguments the model wrote, and runs only when the policy allows it or a human approves it. Any
other outcome is returned to the model as the tool's output, a message saying what happened, as
the SDK documents for tool errors the model should see; the run goes on.

The SDK's own `timeout_seconds` on a tool also bounds the wait for a human: leave it unset (or
long) and use `timeout=` here instead. Install with `pip install 'sudo-queue[openai-agents]'`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from agents import FunctionTool
from agents.tool_context import ToolContext

from sudo_queue.gate import Gate
from sudo_queue.toolcall import Refusal, check_call

__all__ = ["gated_function_tool"]


def gated_function_tool(
    tool: FunctionTool,
    gate: Gate,
    *,
    resource: str | None = None,
    action: str = "call",
    key: Callable[[dict[str, Any]], str] | None = None,
    timeout: float | None = None,
) -> FunctionTool:
    """A copy of `tool` that asks `gate` before each call (resource defaults to the tool's name).

    `key(args)` may derive an idempotency key from the call's arguments; leave it None unless
    the same arguments really mean the same call (a reused key re-attaches to the earlier
    request and its decision).
    """
    invoke = tool.on_invoke_tool
    gate_resource = resource or tool.name

    async def on_invoke_tool(ctx: ToolContext[Any], arguments: str) -> Any:
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            return f"Not run: the arguments of {tool.name!r} are not valid JSON ({exc}); fix them."
        if not isinstance(args, dict):
            return f"Not run: the arguments of {tool.name!r} must be a JSON object."
        outcome = await check_call(
            gate,
            gate_resource,
            action,
            args,
            tool=tool.name,
            key=key(args) if key is not None else None,
            timeout=timeout,
        )
        if isinstance(outcome, Refusal):
            return outcome.message
        return await invoke(ctx, arguments)

    return dataclasses.replace(tool, on_invoke_tool=on_invoke_tool)
