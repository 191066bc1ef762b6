"""The request record, its status, and the Decision an agent gets back."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from .errors import InvalidRequest

__all__ = [
    "DEFAULT_MAX_ARGS_BYTES",
    "Decision",
    "RequestRecord",
    "Status",
    "canonical_json",
    "digest",
]

DEFAULT_MAX_ARGS_BYTES = 64 * 1024
# Deeper than any real tool call; shallow enough that encoders and Lua never recurse dangerously.
MAX_DEPTH = 64
MAX_NAME_LENGTH = 200


class Status(StrEnum):
    """Where a request is in its lifecycle (DESIGN.md's state machine)."""

    QUEUED = "queued"
    PENDING = "pending"
    ALLOWED = "allowed"
    APPROVED = "approved"
    DENIED = "denied"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once nothing can change the request any more."""
        return self not in (Status.QUEUED, Status.PENDING)

    @property
    def granted(self) -> bool:
        """True for the two statuses that let the call run."""
        return self in (Status.ALLOWED, Status.APPROVED)


def _check_plain_json(value: Any, what: str) -> None:
    """Raise InvalidRequest unless `value` is plain JSON: str keys, finite numbers, no cycles."""
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    on_path: set[int] = set()
    exits: list[int] = []
    while stack:
        node, path, depth = stack.pop()
        if node is _EXIT:
            on_path.discard(exits.pop())
            continue
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"{path} nests deeper than {MAX_DEPTH} levels; flatten it")
        if node is None or isinstance(node, bool | str | int):
            continue
        if isinstance(node, float):
            if not math.isfinite(node):
                raise InvalidRequest(f"{path} is {node!r}; JSON has no NaN or Infinity")
            continue
        if isinstance(node, dict | list | tuple):
            if id(node) in on_path:
                raise InvalidRequest(f"{path} refers back to itself (a cycle); pass plain data")
            on_path.add(id(node))
            exits.append(id(node))
            stack.append((_EXIT, path, depth))
            if isinstance(node, dict):
                for k, v in node.items():
                    if not isinstance(k, str):
                        raise InvalidRequest(
                            f"{path} has the key {k!r} of type {type(k).__name__}; "
                            "JSON object keys must be strings"
                        )
                    stack.append((v, f"{path}.{k}", depth + 1))
            else:
                for i, v in enumerate(node):
                    stack.append((v, f"{path}[{i}]", depth + 1))
            continue
        raise InvalidRequest(
            f"{path} is a {type(node).__name__}, which is not JSON; pass str, int, float, "
            "bool, None, list or dict (encode bytes as base64 or hex first)"
        )


_EXIT = object()


def canonical_json(value: Any, *, what: str = "args", max_bytes: int | None = None) -> str:
    """Encode plain JSON canonically (sorted keys, no spaces, UTF-8); InvalidRequest otherwise."""
    _check_plain_json(value, what)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if max_bytes is not None:
        size = len(text.encode())
        if size > max_bytes:
            raise InvalidRequest(
                f"{what} is {size} bytes as JSON, over the limit of {max_bytes}; pass a "
                "reference (an id, a URL) instead of the payload, or raise max_args_bytes"
            )
    return text


def digest(canonical: str) -> str:
    """SHA-256 hex of a canonical JSON text: what an approval is bound to."""
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_name(value: str, what: str) -> str:
    """Validate an agent/resource/action name: non-empty, short, printable, no spaces."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"{what} is {len(value)} characters; the limit is {MAX_NAME_LENGTH}")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidRequest(f"{what} {value!r} has spaces or control characters; use a plain name")
    return value


def ms_to_datetime(ms: int | str | None) -> datetime | None:
    """Redis keeps times as integer milliseconds of the server clock."""
    if ms is None or ms == "":
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)


class RequestRecord(BaseModel):
    """One request as Redis holds it: the single source of truth."""

    model_config = ConfigDict(frozen=True)

    id: str
    agent: str
    resource: str
    action: str
    args: Any = None
    args_digest: str
    key: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    status: Status
    rule: str | None = None
    reason: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    decided_at: datetime | None = None
    decided_by: str | None = None
    approvers: list[str] = Field(default_factory=list)
    min_approvals: int = 1
    approvals: list[str] = Field(default_factory=list)
    channel: str | None = None
    policy_version: str | None = None

    def decision(self) -> Decision:
        """The agent-facing view of this record."""
        return Decision(
            request_id=self.id,
            status=self.status,
            reason=self.reason,
            rule=self.rule,
            decided_by=self.decided_by,
            decided_at=self.decided_at,
            args_digest=self.args_digest,
        )


class Decision(BaseModel):
    """What `gate.request` returns (granted) or carries in `RequestDenied.decision`."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    status: Status
    reason: str | None = None
    rule: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    args_digest: str

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented pattern
    @property
    def granted(self) -> bool:
        """True when the call may run (allowed by a rule or approved by humans)."""
        return self.status.granted

    def __str__(self) -> str:
        who = f" by {self.decided_by}" if self.decided_by else ""
        rule = f" (rule {self.rule})" if self.rule else ""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.status.value}{who}{rule}{why} [request {self.request_id}]"
