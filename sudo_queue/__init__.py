"""sudo-queue: a human-approval gate for AI-agent tool calls, on Redis."""

from __future__ import annotations

from .audit import AuditLog
from .errors import (
    GateUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    PolicyError,
    RequestDenied,
    RequestNotFound,
    SudoQueueError,
    WaitTimeout,
)
from .gate import Gate
from .models import Decision, RequestRecord, Status
from .redact import redact
from .store import Outcome, Store, TransitionResult

__all__ = [
    "AuditLog",
    "Decision",
    "Gate",
    "GateUnavailable",
    "IdempotencyConflict",
    "InvalidRequest",
    "Outcome",
    "PolicyError",
    "RequestDenied",
    "RequestNotFound",
    "RequestRecord",
    "Status",
    "Store",
    "SudoQueueError",
    "TransitionResult",
    "WaitTimeout",
    "redact",
]

__version__ = "0.1.0"
