"""An OpenAI Agents SDK agent whose tools ask sudo-queue first; runs offline, with no API key.

    python examples/openai_agents_agent.py

A scripted model (the SDK's own agents.testing.ScriptedModel) asks for two tool calls: a 20 USD
charge, which config/policy.yaml allows, and dropping a table, which it denies. The denial is
the tool's output, a message the model reads, and the run goes on to a final answer. Tracing is
switched off, so nothing is sent anywhere. Redis is a throwaway redis-server (in-memory if there
is none) with the policy worker running in this process; none of your own Redis is touched.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.items import ToolCallOutputItem
from agents.testing import ScriptedModel, assistant_message, function_call

from sudo_queue.adapters.openai_agents import gated_function_tool
from sudo_queue.embedded import local_stack
from sudo_queue.logs import configure_logging

POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"


@function_tool
async def charge_card(amount: int, customer: str) -> str:
    """Charge a customer's card; amount in USD."""
    return f"charged {amount} USD to {customer}"


@function_tool
async def drop_table(table: str) -> str:
    """Drop a database table."""
    return f"dropped table {table}"


def scripted_model() -> ScriptedModel:
    """Two turns: call both tools, then answer."""
    return ScriptedModel(
        [
            [
                function_call("charge_card", {"amount": 20, "customer": "cus_42"}, call_id="c1"),
                function_call("drop_table", {"table": "users"}, call_id="c2"),
            ],
            [assistant_message("Charged cus_42; the table drop was refused, so I stopped.")],
        ]
    )


async def main() -> int:
    configure_logging("console", "warning")
    set_tracing_disabled(True)
    async with local_stack(policy_path=POLICY) as stack, stack.gate("billing-bot") as gate:
        agent = Agent(
            name="billing-bot",
            instructions="You charge customers and look after the database.",
            model=scripted_model(),
            tools=[
                gated_function_tool(charge_card, gate, resource="stripe", action="charge"),
                gated_function_tool(drop_table, gate, resource="postgres", action="drop_table"),
            ],
        )
        result = await Runner.run(agent, "Charge cus_42 20 USD, then drop the users table.")
    for item in result.new_items:
        if isinstance(item, ToolCallOutputItem):
            print(f"tool output: {item.output}")
    print(f"model: {result.final_output}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
