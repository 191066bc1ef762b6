"""LangChain and LangGraph: a tool that asks sudo-queue before each call.

```python
from sudo_queue.adapters.langchain import gated_tool

charge = gated_tool(charge_card, gate, resource="stripe", action="charge")
```

The gated tool has the wrapped tool's name, description and argument schema, so the model sees
the same tool. Each call first goes through `gate.request(resource, action, args)` with the
call's arguments; it runs only when the policy allows it or a human approves it. Anything else
(denied, rejected, expired, no decision in time, the gate unreachable) becomes a `ToolMessage`
with `status="error"` whose text tells the model what happened, and the agent's run goes on.
An error of the wrapped tool itself is handled as that tool's `handle_tool_error` says.

The gate is asynchronous: call the tool with `ainvoke` (LangGraph's ToolNode and LangChain's
agents do when they run async). Install with `pip install 'sudo-queue[langchain]'`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, SkipValidation

from sudo_queue.gate import Gate
from sudo_queue.toolcall import Refusal, check_call

__all__ = ["GateRefused", "GatedTool", "gated_tool"]


class GateRefused(ToolException):
    """The gate did not grant the call; the message is written for the model."""


def _model_visible(tool: BaseTool, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments the model wrote: injected ones (state, tool call id) are not sent."""
    schema = tool.tool_call_schema
    if isinstance(schema, dict):
        names = set(schema.get("properties", {}))
    elif isinstance(schema, type) and issubclass(schema, BaseModel):
        names = set(schema.model_fields)
    else:
        return arguments
    return {name: value for name, value in arguments.items() if name in names}


class GatedTool(BaseTool):
    """A LangChain tool that runs `tool` only when the sudo-queue gate grants the call."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tool: SkipValidation[BaseTool]
    gate: SkipValidation[Gate]
    resource: str
    action: str
    key: SkipValidation[Callable[[dict[str, Any]], str] | None] = None
    """Computes an idempotency key from the call's arguments (None: every call is new)."""
    timeout: float | None = None
    """Seconds to wait for a human; after that the model hears the call is still waiting."""

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self.name}: the sudo-queue gate is asynchronous; call the tool with ainvoke()"
        )

    async def _arun(
        self,
        *args: Any,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        # A tool without a schema takes one string; one with a schema takes keyword arguments.
        tool_input: str | dict[str, Any] = args[0] if args and not kwargs else kwargs
        call_args = (
            {"input": tool_input}
            if isinstance(tool_input, str)
            else _model_visible(self.tool, tool_input)
        )
        outcome = await check_call(
            self.gate,
            self.resource,
            self.action,
            call_args,
            tool=self.name,
            key=self.key(call_args) if self.key is not None else None,
            timeout=self.timeout,
        )
        if isinstance(outcome, Refusal):
            raise GateRefused(outcome.message)
        callbacks = run_manager.get_child() if run_manager is not None else None
        if self.tool.response_format == "content_and_artifact":
            message = await self.tool.arun(
                tool_input, callbacks=callbacks, tool_call_id=f"sudo-queue:{outcome.request_id}"
            )
            if isinstance(message, ToolMessage):
                return message.content, message.artifact
            return message, None
        return await self.tool.arun(tool_input, callbacks=callbacks)


def _refusals_as_messages(error: ToolException) -> Any:
    """Gate refusals become tool error messages. Any other ToolException got out of the
    wrapped tool's own run, whose handle_tool_error let it through: it keeps propagating, as it
    would without the gate."""
    if isinstance(error, GateRefused):
        return str(error)
    raise error


def gated_tool(
    tool: BaseTool,
    gate: Gate,
    *,
    resource: str | None = None,
    action: str = "call",
    key: Callable[[dict[str, Any]], str] | None = None,
    timeout: float | None = None,
) -> GatedTool:
    """Wrap `tool` so each call asks `gate` first (resource defaults to the tool's name).

    `key(args)` may derive an idempotency key from the call's arguments; leave it None unless
    the same arguments really mean the same call (a reused key re-attaches to the earlier
    request and its decision).
    """
    return GatedTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        handle_validation_error=tool.handle_validation_error,
        handle_tool_error=_refusals_as_messages,
        tags=tool.tags,
        metadata=tool.metadata,
        tool=tool,
        gate=gate,
        resource=resource or tool.name,
        action=action,
        key=key,
        timeout=timeout,
    )
