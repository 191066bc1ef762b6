"""Names that several modules share: Redis key layout, arq's keys, defaults."""

from __future__ import annotations

DEFAULT_NAMESPACE = "sq"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RETENTION_S = 7 * 24 * 3600

# arq 0.28's own key prefixes (arq/constants.py). The store writes jobs in arq's format itself
# so that creating a request and enqueueing its evaluation is one atomic step; importing arq
# here would pull its worker into `import sudo_queue`.
ARQ_JOB_PREFIX = "arq:job:"
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
ARQ_RETRY_PREFIX = "arq:retry:"

# Job ids derive from the request id, so arq never runs two evaluations of one request at once.
EVAL_JOB_PREFIX = "sq-eval:"
EXPIRE_JOB_PREFIX = "sq-expire:"

# The agent name the system uses as `decided_by` for decisions no human made.
POLICY_ACTOR = "policy"
EXPIRY_ACTOR = "sudo-queue"


class Keys:
    """The Redis key layout of one namespace; every key sudo-queue touches is named here."""

    __slots__ = (
        "audit",
        "audit_head",
        "channel_prefix",
        "idem_prefix",
        "inbox_prefix",
        "namespace",
        "pending",
        "policy",
        "queue",
        "queued",
        "request_prefix",
        "votes_prefix",
    )

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not namespace or any(c.isspace() or c == ":" for c in namespace):
            raise ValueError(f"namespace {namespace!r} must be non-empty, without ':' or spaces")
        self.namespace = namespace
        self.request_prefix = f"{namespace}:req:"
        self.votes_prefix = f"{namespace}:votes:"
        self.idem_prefix = f"{namespace}:idem:"
        self.channel_prefix = f"{namespace}:chan:"
        # A Gate's own channel: the ids of the requests it created, on each transition.
        self.inbox_prefix = f"{namespace}:inbox:"
        self.queued = f"{namespace}:queued"
        self.pending = f"{namespace}:pending"
        self.queue = f"{namespace}:queue"
        self.audit = f"{namespace}:audit"
        # The audit chain's head (hash, count) and retained anchor, next to the stream.
        self.audit_head = f"{namespace}:audit:head"
        # The policy the workers run (version, redaction key patterns), for other processes.
        self.policy = f"{namespace}:policy"

    def request(self, request_id: str) -> str:
        return self.request_prefix + request_id

    def votes(self, request_id: str) -> str:
        return self.votes_prefix + request_id

    def channel(self, request_id: str) -> str:
        return self.channel_prefix + request_id

    def inbox(self, token: str) -> str:
        return self.inbox_prefix + token
