"""The Slack messages, as Block Kit: what approvers see, built only from a request record.

Everything here is a pure function of its arguments, so what a message shows can be tested
without Slack. Text that comes from a request (args, names, reasons) is escaped the way Slack
asks (`&`, `<`, `>` as entities) and kept out of mrkdwn's reach: it cannot ping (`<!channel>`,
`<@U...>`), link or format the message.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sudo_queue.models import RequestRecord, Status
from sudo_queue.redact import redact

from .slack_config import USER_ID

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

__all__ = [
    "ACTION_APPROVE",
    "ACTION_REJECT",
    "METADATA_EVENT",
    "REJECT_VIEW",
    "Message",
    "args_code_block",
    "decide_block_id",
    "escape",
    "parse_decide_block_id",
    "reject_modal",
    "render_key",
    "request_message",
]

ACTION_APPROVE = "sudo_queue.approve"
ACTION_REJECT = "sudo_queue.reject"
REJECT_VIEW = "sudo_queue.reject_reason"
REASON_BLOCK = "reason"
REASON_INPUT = "reason"
METADATA_EVENT = "sudo_queue_request"
DECIDE_BLOCK_PREFIX = "sudo_queue.decide:"
MAX_REASON_CHARS = 500
# A section's text holds at most 3000 characters; the code fence and the note need some.
ARGS_BUDGET = 2700
_DIGEST = re.compile(r"[0-9a-f]{64}")

_OUTCOME = {
    Status.APPROVED: (":white_check_mark:", "Approved"),
    Status.REJECTED: (":x:", "Rejected"),
    Status.EXPIRED: (":hourglass:", "Expired"),
    Status.CANCELLED: (":no_entry_sign:", "Cancelled"),
    Status.ALLOWED: (":white_check_mark:", "Allowed"),
    Status.DENIED: (":no_entry:", "Denied"),
}


def escape(text: str) -> str:
    """Slack's escaping: `&`, `<` and `>` become entities, so nothing in `text` is a control."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _visible(text: str) -> str:
    """Spell out invisible and direction-changing characters (U+202E ...) as \\uXXXX escapes.

    An approver must see the characters that are there; a right-to-left override could make
    `evil.com` read as `moc.live`.
    """
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cf", "Cs", "Co", "Cn") else c
        for c in text
    )


def inline_code(text: str) -> str:
    """`text` as inline code: escaped, visible, and unable to close the code span."""
    return "`" + escape(_visible(text)).replace("`", "\u02cb") + "`"


def _fit(text: str, budget: int) -> tuple[str, int]:
    """Escape `text` up to `budget` escaped characters; return it and how many source chars fit."""
    out: list[str] = []
    used = 0
    for i, char in enumerate(text):
        piece = escape(char)
        if used + len(piece) > budget:
            return "".join(out), i
        out.append(piece)
        used += len(piece)
    return "".join(out), len(text)


def args_code_block(
    args: Any, *, extra_keys: Sequence[str] = (), budget: int = ARGS_BUDGET
) -> tuple[str, bool, bool]:
    """Pretty JSON of the redacted args in a code block; (mrkdwn, redacted, truncated)."""
    shown = redact(args, extra_keys=extra_keys)
    pretty = _visible(json.dumps(shown, indent=2, sort_keys=True, ensure_ascii=False))
    # A run of three backticks would close the fence; a zero-width space between backticks keeps
    # the text as it reads while making the run impossible.
    fenced = re.sub(r"`(?=`)", "`\u200b", pretty)
    body, fitted = _fit(fenced, budget)
    truncated = fitted < len(fenced)
    if truncated:
        body += f"\n… {len(fenced[fitted:].replace(chr(0x200B), ''))} more characters not shown"
    return f"```\n{body}\n```", shown != args, truncated


def _when(moment: datetime) -> str:
    """A Slack date token: shown in each reader's time zone, with an ISO fallback."""
    epoch = int(moment.timestamp())
    return f"<!date^{epoch}^{{date_short_pretty}} {{time}}|{moment.isoformat()}>"


def actor_ref(actor: str) -> str:
    """A Slack user id as a mention; any other actor (a CLI name, the expiry) as inline code."""
    return f"<@{actor}>" if USER_ID.fullmatch(actor) else inline_code(actor)


def _approver_ref(entry: str) -> str:
    if USER_ID.fullmatch(entry):
        return f"<@{entry}>"
    return inline_code(entry)


def decide_block_id(args_digest: str) -> str:
    """The actions block's id carries the digest the approver saw; a click is bound to it."""
    return DECIDE_BLOCK_PREFIX + args_digest


def parse_decide_block_id(block_id: str) -> str | None:
    """The args digest of a click's actions block, or None if the block is not ours."""
    if not block_id.startswith(DECIDE_BLOCK_PREFIX):
        return None
    digest = block_id[len(DECIDE_BLOCK_PREFIX) :]
    return digest if _DIGEST.fullmatch(digest) else None


def render_key(record: RequestRecord) -> str:
    """What a message shows, in short: a message is updated only when this changes."""
    if record.status is Status.PENDING:
        return f"pending:{len(record.approvals)}"
    return record.status.value


@dataclass(frozen=True, slots=True)
class Message:
    """The arguments of chat.postMessage / chat.update for one request."""

    text: str
    blocks: list[dict[str, Any]]
    metadata: dict[str, Any]


def _mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def request_message(
    record: RequestRecord,
    *,
    namespace: str,
    approvers: Sequence[str],
    extra_redact_keys: Sequence[str] = (),
) -> Message:
    """The approval message for a record: buttons while pending, the outcome once decided."""
    call = f"{record.resource}.{record.action}"
    pending = record.status is Status.PENDING
    title = "Approval needed" if pending else "Approval request"
    text = f"{title}: {escape(record.agent)} wants to run {escape(call)}"
    who = ", ".join(_approver_ref(a) for a in approvers) or "nobody (use the CLI)"
    fields = [
        _mrkdwn(f"*Agent*\n{inline_code(record.agent)}"),
        _mrkdwn(f"*Call*\n{inline_code(call)}"),
        _mrkdwn(f"*Rule*\n{inline_code(record.rule or '-')}"),
        _mrkdwn(f"*Deadline*\n{_when(record.expires_at) if record.expires_at else '-'}"),
        _mrkdwn(f"*Approvers*\n{who}"),
        _mrkdwn(f"*Approvals*\n{len(record.approvals)} of {record.min_approvals}"),
    ]
    code, redacted, truncated = args_code_block(record.args, extra_keys=extra_redact_keys)
    notes = [f"request {inline_code(record.id)}", f"args digest {inline_code(record.args_digest)}"]
    if redacted:
        notes.append("secrets redacted")
    if truncated:
        notes.append("args truncated: `sudo-queue show` prints them in full")
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": _mrkdwn(
                f"*{title}*: {inline_code(record.agent)} wants to run {inline_code(call)}"
            ),
        },
        {"type": "section", "fields": fields},
    ]
    rule_reason = record.reason if pending else None
    if rule_reason:
        blocks.append({"type": "section", "text": _mrkdwn(f"*Reason*\n{escape(rule_reason)}")})
    blocks.append({"type": "section", "text": _mrkdwn(f"*Args*\n{code}")})
    blocks.append({"type": "context", "elements": [_mrkdwn(" · ".join(notes))]})
    if pending:
        if record.approvals:
            voted = ", ".join(actor_ref(a) for a in record.approvals)
            blocks.append({"type": "context", "elements": [_mrkdwn(f"Approved so far by {voted}")]})
        blocks.append(
            {
                "type": "actions",
                "block_id": decide_block_id(record.args_digest),
                "elements": [
                    {
                        "type": "button",
                        "action_id": ACTION_APPROVE,
                        "text": {"type": "plain_text", "text": "Approve"},
                        "style": "primary",
                        "value": record.id,
                    },
                    {
                        "type": "button",
                        "action_id": ACTION_REJECT,
                        "text": {"type": "plain_text", "text": "Reject"},
                        "style": "danger",
                        "value": record.id,
                    },
                ],
            }
        )
    else:
        outcome = outcome_text(record)
        text = f"{title}: {escape(record.agent)} {escape(call)}: {record.status.value}"
        blocks.append({"type": "section", "text": _mrkdwn(outcome)})
    return Message(
        text=text,
        blocks=blocks,
        metadata={
            "event_type": METADATA_EVENT,
            "event_payload": {"request_id": record.id, "namespace": namespace},
        },
    )


def outcome_text(record: RequestRecord) -> str:
    """One line saying how a decided request ended, who decided and when."""
    emoji, word = _OUTCOME.get(record.status, (":grey_question:", record.status.value))
    when = f" at {_when(record.decided_at)}" if record.decided_at else ""
    if record.status is Status.APPROVED and len(record.approvals) > 1:
        who = " by " + ", ".join(actor_ref(a) for a in record.approvals)
    elif record.status is Status.EXPIRED:
        who = ": nobody decided before the deadline"
    else:
        who = f" by {actor_ref(record.decided_by)}" if record.decided_by else ""
    line = f"{emoji} *{word}*{who}{when}"
    if record.status in (Status.REJECTED, Status.CANCELLED) and record.reason:
        line += f"\n>{escape(record.reason)}"
    return line


def state_text(record: RequestRecord) -> str:
    """For an ephemeral reply: the request is no longer open, and how it ended."""
    emoji, word = _OUTCOME.get(record.status, (":grey_question:", record.status.value))
    who = f" by {actor_ref(record.decided_by)}" if record.decided_by else ""
    when = f" at {_when(record.decided_at)}" if record.decided_at else ""
    return f"{emoji} This request was already {word.lower()}{who}{when}; nothing changed."


def reject_modal(record: RequestRecord, *, channel: str) -> dict[str, Any]:
    """The dialog a Reject click opens: an optional reason that reaches the agent."""
    call = f"{record.resource}.{record.action}"
    return {
        "type": "modal",
        "callback_id": REJECT_VIEW,
        "private_metadata": json.dumps({"request_id": record.id, "channel": channel}),
        "title": {"type": "plain_text", "text": "Reject request"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "section",
                "text": _mrkdwn(
                    f"Reject {inline_code(call)} for {inline_code(record.agent)} "
                    f"(request {inline_code(record.id)})?"
                ),
            },
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "optional": True,
                "label": {"type": "plain_text", "text": "Reason (the agent sees it)"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": MAX_REASON_CHARS,
                },
            },
        ],
    }
