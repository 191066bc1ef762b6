"""The tool-call boundary that every framework adapter shares.

An adapter asks the gate before a tool runs. When the answer is no (denied, rejected, expired,
cancelled, no decision in time, or the gate unreachable), the model must get a message it can read
as the tool's result, not an exception that ends the agent's run: `check_call` turns every such
outcome into a `Refusal` with that message. The call runs only when `check_call` returns a granted
`Decision`, so every failure stays closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydantic_core import to_jsonable_python

from .constants import POLICY_ACTOR
from .errors import GateUnavailable, InvalidRequest, RequestDenied, SudoQueueError, WaitTimeout

if TYPE_CHECKING:
    from .gate import Gate
    from .models import Decision

__all__ = ["Refusal", "check_call", "plain_args"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a tool call did not run, worded for the model that asked for it."""

    message: str
    decision: Decision | None = None
    """The final decision when there is one (denied, rejected, expired, cancelled)."""
    request_id: str | None = None


def plain_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Tool arguments as plain JSON (framework-validated values such as dates become strings)."""
    plain = to_jsonable_python(dict(args), fallback=str)
    return plain if isinstance(plain, dict) else {"args": plain}


async def check_call(
    gate: Gate,
    resource: str,
    action: str,
    args: Mapping[str, Any],
    *,
    tool: str,
    key: str | None = None,
    timeout: float | None = None,
) -> Decision | Refusal:
    """Ask the gate about one tool call: the granted Decision, or a Refusal for the model."""
    call = f"{resource}.{action}"
    try:
        return await gate.request(resource, action, plain_args(args), key=key, timeout=timeout)
    except RequestDenied as exc:
        decision = exc.decision
        who = f" by {decision.decided_by}" if decision.decided_by else ""
        if decision.decided_by == POLICY_ACTOR:
            who = " by the policy"
        rule = f" (rule {decision.rule!r})" if decision.rule else ""
        why = f": {decision.reason}" if decision.reason else ""
        return Refusal(
            f"Not run: the call {call} (tool {tool!r}) was {decision.status.value}{who}{rule}"
            f"{why}. Do not retry it; tell the user. [request {decision.request_id}]",
            decision=decision,
            request_id=decision.request_id,
        )
    except WaitTimeout as exc:
        return Refusal(
            f"Not run: nobody decided the call {call} (tool {tool!r}) within "
            f"{exc.timeout:g}s. The request stays open; tell the user it awaits approval. "
            f"[request {exc.request_id}]",
            request_id=exc.request_id,
        )
    except InvalidRequest as exc:
        return Refusal(
            f"Not run: the arguments of the call {call} (tool {tool!r}) cannot be sent for "
            f"approval ({exc})."
        )
    except GateUnavailable as exc:
        log.error("tool_call_gate_unavailable", tool=tool, call=call, error=str(exc))
        return Refusal(
            f"Not run: the call {call} (tool {tool!r}) could not be checked because the "
            "approval service is unavailable. Tell the user."
        )
    except SudoQueueError as exc:
        log.error("tool_call_refused", tool=tool, call=call, error=str(exc))
        return Refusal(f"Not run: the call {call} (tool {tool!r}) was refused ({exc}).")
