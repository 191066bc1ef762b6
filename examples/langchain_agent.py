"""A LangChain agent whose tools ask sudo-queue first; runs offline, with no API key.

    python examples/langchain_agent.py

A scripted chat model (LangChain's GenericFakeChatModel) asks for two tool calls: a 20 USD
charge, which config/policy.yaml allows, and dropping a table, which it denies. The denial comes
back as a ToolMessage with status "error" that the model reads, and the loop goes on. The loop
is the one LangGraph's ToolNode runs; with LangGraph, pass the gated tools to it instead. Redis
is a throwaway redis-server (in-memory if there is none) with the policy worker running in this
process; none of your own Redis is touched.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool

from sudo_queue.adapters.langchain import gated_tool
from sudo_queue.embedded import local_stack
from sudo_queue.logs import configure_logging

POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"


@tool
async def charge_card(amount: int, customer: str) -> str:
    """Charge a customer's card; amount in USD."""
    return f"charged {amount} USD to {customer}"


@tool
async def drop_table(table: str) -> str:
    """Drop a database table."""
    return f"dropped table {table}"


def scripted_model() -> GenericFakeChatModel:
    """Two turns: call both tools, then answer."""
    calls = [
        {"name": "charge_card", "args": {"amount": 20, "customer": "cus_42"}, "id": "call-1"},
        {"name": "drop_table", "args": {"table": "users"}, "id": "call-2"},
    ]
    return GenericFakeChatModel(
        messages=iter(
            [
                AIMessage(content="", tool_calls=calls),
                AIMessage(content="Charged cus_42; the table drop was refused, so I stopped."),
            ]
        )
    )


async def run_agent(
    model: GenericFakeChatModel, tools: list[BaseTool], prompt: str
) -> list[BaseMessage]:
    """The tool-calling loop: ask the model, run the tools it calls, repeat until it answers."""
    by_name = {t.name: t for t in tools}
    messages: list[BaseMessage] = [HumanMessage(prompt)]
    while True:
        reply = await model.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(await by_name[call["name"]].ainvoke(call))


async def main() -> int:
    configure_logging("console", "warning")
    async with local_stack(policy_path=POLICY) as stack, stack.gate("billing-bot") as gate:
        tools = [
            gated_tool(charge_card, gate, resource="stripe", action="charge"),
            gated_tool(drop_table, gate, resource="postgres", action="drop_table"),
        ]
        messages = await run_agent(
            scripted_model(), tools, "Charge cus_42 20 USD, then drop the users table."
        )
    for message in messages:
        if isinstance(message, ToolMessage):
            print(f"tool {message.name} [{message.status}]: {message.content}")
        elif isinstance(message, AIMessage) and message.content:
            print(f"model: {message.content}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
