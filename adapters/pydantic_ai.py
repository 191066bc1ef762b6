"""Pydantic AI: a toolset that asks sudo-queue before each tool call.

```python
from pydantic_ai import Agent
from pydantic_ai.toolsets import FunctionToolset
from sudo_queue.adapters.pydantic_ai import gated_toolset

tools = FunctionToolset([charge_card, drop_table])
agent = Agent(model, toolsets=[gated_toolset(tools, gate, calls={
    "charge_card": ("stripe", "charge"),
    "drop_table": ("postgres", "drop_table"),
})])
```

`GatedToolset` wraps any toolset (function tools, MCP servers ...). Each call first goes through
`gate.request(resource, action, args)` with the validated arguments and runs only when the
policy allows it or a human approves it. Any other outcome raises Pydantic AI's `ToolFailed`:
the model gets a failed tool result saying what happened (it does not count as a retry) and the
run goes on. Install with `pip install 'sudo-queue[pydantic-ai]'`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai.exceptions import ToolFailed
from pydantic_ai.tools import AgentDepsT, RunContext
from pydantic_ai.toolsets import AbstractToolset, WrapperToolset
from pydantic_ai.toolsets.abstract import ToolsetTool

from sudo_queue.gate import Gate
from sudo_queue.toolcall import Refusal, check_call

__all__ = ["GatedToolset", "gated_toolset"]


@dataclass
class GatedToolset(WrapperToolset[AgentDepsT]):
    """Runs the wrapped toolset's tools only when the sudo-queue gate grants the call."""

    gate: Gate
    calls: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Tool name -> (resource, action) as the policy names them; others: (tool name, "call")."""
    key: Callable[[str, dict[str, Any]], str] | None = None
    """Computes an idempotency key from (tool name, arguments); None: every call is new."""
    timeout: float | None = None
    """Seconds to wait for a human; after that the model hears the call is still waiting."""

    async def call_tool(
        self,
        name: str,
        tool_args: dict[str, Any],
        ctx: RunContext[AgentDepsT],
        tool: ToolsetTool[AgentDepsT],
    ) -> Any:
        resource, action = self.calls.get(name, (name, "call"))
        outcome = await check_call(
            self.gate,
            resource,
            action,
            tool_args,
            tool=name,
            key=self.key(name, tool_args) if self.key is not None else None,
            timeout=self.timeout,
        )
        if isinstance(outcome, Refusal):
            raise ToolFailed(outcome.message)
        return await super().call_tool(name, tool_args, ctx, tool)


def gated_toolset(
    toolset: AbstractToolset[AgentDepsT],
    gate: Gate,
    *,
    calls: Mapping[str, tuple[str, str]] | None = None,
    key: Callable[[str, dict[str, Any]], str] | None = None,
    timeout: float | None = None,
) -> GatedToolset[AgentDepsT]:
    """Wrap `toolset` so each call asks `gate` first.

    `calls` maps tool names to the (resource, action) the policy uses; a tool not in it asks as
    resource <tool name>, action "call".
    """
    return GatedToolset(toolset, gate, dict(calls or {}), key, timeout)
