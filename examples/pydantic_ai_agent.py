"""A Pydantic AI agent whose tools ask sudo-queue first; runs offline, with no API key.

    python examples/pydantic_ai_agent.py

A scripted model (Pydantic AI's FunctionModel) asks for two tool calls: a 20 USD charge, which
config/policy.yaml allows, and dropping a table, which it denies. The denial reaches the model as
a failed tool result it can read, and the run goes on to a final answer. Redis is a throwaway
redis-server (in-memory if there is none) with the policy worker running in this process; none of
your own Redis is touched.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pydantic_ai import Agent
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

from sudo_queue.adapters.pydantic_ai import gated_toolset
from sudo_queue.embedded import local_stack
from sudo_queue.logs import configure_logging

POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"


async def charge_card(amount: int, customer: str) -> str:
    """Charge a customer's card; amount in USD."""
    return f"charged {amount} USD to {customer}"


async def drop_table(table: str) -> str:
    """Drop a database table."""
    return f"dropped table {table}"


def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """First turn: call both tools. Second turn: report what the tools answered."""
    returns = [
        part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    ]
    if not returns:
        return ModelResponse(
            parts=[
                ToolCallPart("charge_card", {"amount": 20, "customer": "cus_42"}, "call-1"),
                ToolCallPart("drop_table", {"table": "users"}, "call-2"),
            ]
        )
    lines = [f"{part.tool_name} ({part.outcome}): {part.content}" for part in returns]
    return ModelResponse(parts=[TextPart("Here is what happened:\n" + "\n".join(lines))])


async def main() -> int:
    configure_logging("console", "warning")
    tools = FunctionToolset([charge_card, drop_table])
    async with local_stack(policy_path=POLICY) as stack, stack.gate("billing-bot") as gate:
        gated = gated_toolset(
            tools,
            gate,
            calls={"charge_card": ("stripe", "charge"), "drop_table": ("postgres", "drop_table")},
        )
        agent = Agent(FunctionModel(scripted_model), toolsets=[gated])
        result = await agent.run("Charge cus_42 20 USD, then drop the users table.")
    print(result.output)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
