"""The tamper-evident audit log: one Redis Stream, one hash chain, written by every process.

Every state transition (created, allowed, denied, pending, each approval vote, approved,
rejected, expired, cancelled) and every policy change (policy_reloaded) appends one entry to the
stream ``<namespace>:audit`` inside the same Lua script as the transition (``transitions.lua``),
so a transition without its entry, or an entry without its transition, cannot happen; and because
Redis runs one script at a time, any number of writers in any number of processes extend a single
chain. Each entry's hash (format 2) is::

    hash_n = H(hash_{n-1} || body_n || seq_n || time_n)
    body_n = SHA-256(canonical(entry_n))

where ``hash_0`` is 32 zero bytes, hashes and bodies enter as their 32 raw bytes, ``seq`` and
``time`` as 8-byte big-endian unsigned integers, ``H`` is SHA-256 (or HMAC-SHA-256 keyed with
``SUDO_QUEUE_AUDIT_KEY`` when the writer holds it; the entry's ``alg`` field says which), the hash
is written as 64 lowercase hex digits, and ``canonical(entry)`` is the netstrings
(``<byte length>:<value>,``, UTF-8) of the :data:`BODY_FIELDS` in that order. The redacted args
are covered through ``redacted_digest`` (SHA-256 of the ``args`` field, checked by
:meth:`AuditLog.verify`).

Redis's Lua has no SHA-2, so the script carries a pure-Lua SHA-256 that costs about 45 us of
Redis time per 64-byte block. The body digest keeps the chain step at two blocks whatever the
entry holds, and a writer that knows the entry it is about to cause passes the body digests
(:func:`entry_bodies`), keyed by their canonical bytes: the script uses one only when the
canonical bytes it builds itself are exactly the key, and hashes the body itself otherwise. A
writer can thus save Redis work but never change what is hashed (a wrong digest would only make
its own entry fail `verify`). Format 1 entries (``H(hash_{n-1} || canonical(entry))`` over all
fields, with the previous hash as hex), written before, still verify.

The chain's head (``hash``, ``count``) lives in ``<namespace>:audit:head``. When
``SUDO_QUEUE_AUDIT_MAXLEN`` trims old entries, the head also keeps the anchor: the hash and
sequence number of the last trimmed entry, from which :meth:`AuditLog.verify` starts.

This module reads and verifies the log; it never writes it (the store's transitions do).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from .constants import DEFAULT_NAMESPACE, Keys
from .errors import GateUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "BODY_FIELDS",
    "CANONICAL_FIELDS",
    "GENESIS",
    "KEYLESS_EVENTS",
    "AuditEntry",
    "AuditLog",
    "Checkpoint",
    "VerifyResult",
    "canonical",
    "clip_reason",
    "entry_bodies",
    "entry_hash",
    "format_table",
    "hmac_pad_states",
    "parse_since",
]

GENESIS = "0" * 64
FORMAT_VERSION = "2"
_FORMATS = frozenset({"1", FORMAT_VERSION})
#: Reasons are clipped to this many bytes in the log (then ``...``); AUDIT_REASON_MAX in Lua.
REASON_MAX_BYTES = 1024

#: The fields an entry holds and its hash covers (the stream also holds ``args``, ``prev`` and
#: ``hash``); format 1 hashed them in this order. Keep in sync with CANON in transitions.lua.
CANONICAL_FIELDS: tuple[str, ...] = (
    "v",
    "seq",
    "event",
    "request_id",
    "agent",
    "resource",
    "action",
    "args_digest",
    "redacted_digest",
    "status",
    "rule",
    "policy_version",
    "actor",
    "reason",
    "time",
    "alg",
)
#: The fields of an entry's body digest, in this order: all but ``seq`` and ``time``, which the
#: chain step covers itself. Keep in sync with BODY in transitions.lua.
BODY_FIELDS: tuple[str, ...] = tuple(f for f in CANONICAL_FIELDS if f not in ("seq", "time"))
_STREAM_FIELDS = (*CANONICAL_FIELDS, "args", "prev", "hash")

#: Events an agent's own process writes (agents are not given the audit key): when the log is
#: verified with a key, only these may be plain SHA-256; every decision must carry an HMAC.
KEYLESS_EVENTS = frozenset({"created", "cancelled", "expired"})

ALG_SHA256 = "sha256"
ALG_HMAC = "hmac-sha256"

_PAGE = 1000
_NEEDS_KEY = "needs key"
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- the hash --------------------------------------------------------------------------------------


def _netstrings(fields: Mapping[str, str], names: tuple[str, ...]) -> bytes:
    out = bytearray()
    for name in names:
        value = fields.get(name, "").encode()
        out += b"%d:%s," % (len(value), value)
    return bytes(out)


def canonical(fields: Mapping[str, str]) -> bytes:
    """The bytes an entry's body digest covers: netstrings of BODY_FIELDS (format 2)."""
    return _netstrings(fields, BODY_FIELDS)


def entry_hash(prev: str, fields: Mapping[str, str], key: bytes | None = None) -> str:
    """The entry's chain hash as hex (SHA-256, or HMAC-SHA-256 with `key`), given the previous
    one; '' when the entry's ``seq``, ``time`` or `prev` cannot be part of any valid hash."""
    if fields.get("v") == "1":
        message = prev.encode() + _netstrings(fields, CANONICAL_FIELDS)
    else:
        try:
            seq, time = int(fields.get("seq", "")), int(fields.get("time", ""))
            message = (
                bytes.fromhex(prev)
                + hashlib.sha256(canonical(fields)).digest()
                + struct.pack(">QQ", seq, time)
            )
        except (ValueError, struct.error):
            return ""
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def entry_bodies(entries: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """{canonical bytes (as text): body digest} for entries a writer is about to cause.

    Passed to the transition script, which uses a digest only for the exact canonical bytes it
    builds itself, so the Redis server hashes two blocks per entry instead of the whole body.
    """
    bodies = {}
    for fields in entries:
        data = canonical({**fields, "v": FORMAT_VERSION})
        bodies[data.decode()] = hashlib.sha256(data).hexdigest()
    return bodies


def clip_reason(reason: str, limit: int = REASON_MAX_BYTES) -> str:
    """A reason as the log keeps it: at most `limit` bytes (never splitting a UTF-8 sequence),
    then ``...``; what the script's clip() does."""
    data = reason.encode()
    if len(data) <= limit:
        return reason
    cut = limit
    while cut > 0 and 0x80 <= data[cut] < 0xC0:  # data[cut] continues a character
        cut -= 1
    return data[:cut].decode() + "..."


_K = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
)  # fmt: skip
_IV = (
    0x6A09E667,
    0xBB67AE85,
    0x3C6EF372,
    0xA54FF53A,
    0x510E527F,
    0x9B05688C,
    0x1F83D9AB,
    0x5BE0CD19,
)
_M32 = 0xFFFFFFFF


def _ror(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M32


def _compress(state: tuple[int, ...], block: bytes) -> tuple[int, ...]:
    """One SHA-256 compression: hashlib does not expose the intermediate state HMAC pads need."""
    w = list(struct.unpack(">16I", block))
    for j in range(16, 64):
        s0 = _ror(w[j - 15], 7) ^ _ror(w[j - 15], 18) ^ (w[j - 15] >> 3)
        s1 = _ror(w[j - 2], 17) ^ _ror(w[j - 2], 19) ^ (w[j - 2] >> 10)
        w.append((w[j - 16] + s0 + w[j - 7] + s1) & _M32)
    a, b, c, d, e, f, g, h = state
    for j in range(64):
        t1 = h + (_ror(e, 6) ^ _ror(e, 11) ^ _ror(e, 25)) + ((e & f) ^ (~e & g)) + _K[j] + w[j]
        t2 = (_ror(a, 2) ^ _ror(a, 13) ^ _ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))
        h, g, f, e, d, c, b, a = g, f, e, (d + t1) & _M32, c, b, a, (t1 + t2) & _M32
    return tuple((x + y) & _M32 for x, y in zip(state, (a, b, c, d, e, f, g, h), strict=True))


def hmac_pad_states(key: bytes) -> str:
    """The SHA-256 states after ``key ^ ipad`` and ``key ^ opad``, as 128 hex digits.

    The Lua script computes HMAC-SHA-256 from these (RFC 2104), so the key itself never travels
    to Redis. They are as powerful as the key for making MACs, so treat them like the key.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    block = key.ljust(64, b"\0")
    inner = _compress(_IV, bytes(b ^ 0x36 for b in block))
    outer = _compress(_IV, bytes(b ^ 0x5C for b in block))
    return "".join(f"{word:08x}" for word in inner + outer)


# -- entries ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit entry as the stream holds it: every field a string, exactly as hashed."""

    stream_id: str
    fields: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.fields.get(name, "")

    @property
    def seq(self) -> int:
        try:
            return int(self["seq"])
        except ValueError:
            return -1

    @property
    def time(self) -> datetime | None:
        try:
            return datetime.fromtimestamp(int(self["time"]) / 1000, tz=UTC)
        except ValueError:
            return None

    @property
    def label(self) -> str:
        """How messages name this entry: its sequence number and stream id."""
        return f"entry #{self['seq'] or '?'} ({self.stream_id})"

    def as_json(self) -> dict[str, Any]:
        """A JSON object for `audit list --json` and `audit export --jsonl` (a SIEM).

        Every stored field is kept as the exact string that was hashed, so an export can be
        re-verified offline; ``stream_id`` and ``at`` (ISO 8601, UTC) are added for convenience.
        """
        out: dict[str, Any] = {"stream_id": self.stream_id}
        when = self.time
        out["at"] = when.isoformat(timespec="milliseconds") if when else None
        out.update(self.fields)
        return out


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The head of the chain at some moment: keep it outside Redis to detect a truncated tail."""

    hash: str
    count: int

    def __str__(self) -> str:
        return f"{self.hash}:{self.count}"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Read ``HASH:COUNT`` as `audit checkpoint` prints it; ValueError otherwise."""
        digest, sep, count = text.strip().partition(":")
        if not sep or not _HEX64.fullmatch(digest) or not count.isdigit():
            raise ValueError(
                f"{text!r} is not a checkpoint; expected HASH:COUNT as `sudo-queue audit "
                "checkpoint` prints it (64 hex digits, a colon, a whole number)"
            )
        return cls(digest, int(count))


@dataclass(slots=True)
class VerifyResult:
    """What `AuditLog.verify` found."""

    ok: bool
    checked: int = 0
    """Entries whose hash was recomputed."""
    head: Checkpoint = field(default_factory=lambda: Checkpoint(GENESIS, 0))
    anchor: Checkpoint = field(default_factory=lambda: Checkpoint(GENESIS, 0))
    """Where verification started: the last trimmed entry (or the genesis)."""
    problem: str = ""
    """Why verification failed, naming the first bad entry."""
    bad_entry: str | None = None
    """The stream id of the first bad entry, when one entry is to blame."""
    needs_key: bool = False
    """The log holds HMAC entries and no key was given: nothing could be concluded."""
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that are not failures (e.g. a checkpoint older than the retention)."""


# -- reading and verifying -------------------------------------------------------------------------


class AuditLog:
    """Read, filter, export and verify the audit stream of one namespace."""

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        key: bytes | str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = Keys(namespace)
        self._key = key.encode() if isinstance(key, str) else key

    async def _call(self, awaitable: Any, what: str) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise GateUnavailable(
                f"could not {what}: Redis failed ({type(exc).__name__}: {exc}); "
                "check that Redis is running and reachable at the configured URL"
            ) from exc

    async def checkpoint(self) -> Checkpoint:
        """The current head: the last entry's hash and the number of entries ever written."""
        raw = await self._call(self.redis.hgetall(self.keys.audit_head), "read the audit head")
        return Checkpoint(raw.get("hash") or GENESIS, int(raw.get("count") or 0))

    async def entries(self, start: str = "-", end: str = "+") -> AsyncIterator[AuditEntry]:
        """Entries oldest first, between stream ids ``start`` and ``end``, read in pages."""
        cursor = start
        while True:
            page = await self._call(
                self.redis.xrange(self.keys.audit, cursor, end, count=_PAGE), "read the audit log"
            )
            for stream_id, fields in page:
                yield AuditEntry(stream_id, dict(fields))
            if len(page) < _PAGE:
                return
            cursor = "(" + page[-1][0]

    async def list_entries(
        self,
        *,
        request_id: str | None = None,
        agent: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries that match, oldest first."""
        low = "-" if since is None else str(int(since.timestamp() * 1000))
        found: list[AuditEntry] = []
        cursor = "+"
        while len(found) < limit:
            page = await self._call(
                self.redis.xrevrange(self.keys.audit, cursor, low, count=_PAGE),
                "read the audit log",
            )
            for stream_id, fields in page:
                entry = AuditEntry(stream_id, dict(fields))
                if request_id is not None and entry["request_id"] != request_id:
                    continue
                if agent is not None and entry["agent"] != agent:
                    continue
                found.append(entry)
                if len(found) >= limit:
                    break
            if len(page) < _PAGE:
                break
            cursor = "(" + page[-1][0]
        found.reverse()
        return found

    async def verify(self, checkpoint: Checkpoint | None = None) -> VerifyResult:
        """Recompute the chain from the retained anchor to the head.

        Detects an edited entry (its content no longer matches its hash), a deleted, inserted or
        reordered one (sequence numbers and previous-hash links break), an entry added without
        moving the head or a head moved without its entry, and, given a ``checkpoint`` taken
        earlier, a truncated tail or a rewritten history. Entries that writers append while it
        runs are verified too.
        """
        result = VerifyResult(ok=False)
        # Trimming may run concurrently and remove entries before we read them: start over from
        # the new anchor then (a bounded number of times).
        for _ in range(3):
            result = await self._verify_once(checkpoint)
            if result.ok or result.needs_key:
                return result
            raw = await self._call(
                self.redis.hget(self.keys.audit_head, "anchor_count"), "read the audit head"
            )
            if str(raw or 0) == str(result.anchor.count):
                return result
        return result

    async def _page(self, cursor: str) -> tuple[dict[str, str], list[Any]]:
        """The head and the next page after ``cursor``, read together (one MULTI)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.audit_head)
            pipe.xrange(self.keys.audit, cursor, "+", count=_PAGE)
            head, page = await self._call(pipe.execute(), "read the audit log")
        return head, page

    def _head_checkpoint(
        self, head_raw: dict[str, str], hash_field: str, count_field: str, result: VerifyResult
    ) -> Checkpoint | None:
        """A checkpoint stored in the audit head; None (and `result.problem`) if malformed."""
        try:
            return Checkpoint(
                head_raw.get(hash_field) or GENESIS, int(head_raw.get(count_field) or 0)
            )
        except ValueError:
            result.problem = f"the audit head {self.keys.audit_head} is malformed: {head_raw!r}"
            return None

    async def _verify_once(self, checkpoint: Checkpoint | None) -> VerifyResult:
        head_raw, page = await self._page("-")
        result = VerifyResult(ok=False)
        anchor = self._head_checkpoint(head_raw, "anchor_hash", "anchor_count", result)
        if anchor is None:
            return result
        result.anchor = anchor
        prev, count = result.anchor.hash, result.anchor.count
        last: AuditEntry | None = None
        while True:
            for stream_id, fields in page:
                entry = AuditEntry(stream_id, dict(fields))
                problem = self._check(entry, prev, count + 1)
                if problem == _NEEDS_KEY:
                    result.needs_key = True
                    result.problem = (
                        f"{entry.label} is HMAC-signed; set SUDO_QUEUE_AUDIT_KEY to the key the "
                        "writers use, then verify again"
                    )
                    return result
                if problem:
                    result.problem, result.bad_entry = problem, entry.stream_id
                    return result
                result.checked += 1
                prev, count, last = entry["hash"], count + 1, entry
            if len(page) < _PAGE:
                break  # the end of the stream, as of `head_raw`, read in the same MULTI
            head_raw, page = await self._page("(" + page[-1][0])
        head_checkpoint = self._head_checkpoint(head_raw, "hash", "count", result)
        if head_checkpoint is None:
            return result
        result.head = head = head_checkpoint
        if head != Checkpoint(prev, count):
            if head.count > count:
                result.problem = (
                    f"the log ends at entry #{count} but its head records #{head.count}: "
                    f"the entries after #{count} were deleted"
                )
            else:
                result.problem = (
                    f"the log runs to entry #{count} but its head records #{head.count}: the "
                    "head was moved back, or entries were added outside sudo-queue"
                )
            result.bad_entry = last.stream_id if last else None
            return result
        if checkpoint is not None:
            result.problem = await self._check_checkpoint(checkpoint, result)
            if result.problem:
                return result
        result.ok = True
        return result

    def _check(self, entry: AuditEntry, prev: str, expected: int) -> str:
        """The problem with one entry: '' if none, _NEEDS_KEY if it cannot be checked."""
        label = entry.label
        missing = [name for name in _STREAM_FIELDS if name not in entry.fields]
        if missing or entry["v"] not in _FORMATS or entry.seq < 0:
            what = f"lacks {', '.join(missing)}" if missing else "has an unknown format"
            return f"{label} {what}: it was edited or written outside sudo-queue"
        if entry.seq > expected:
            gap = f"#{expected}" if entry.seq == expected + 1 else f"#{expected}..#{entry.seq - 1}"
            return f"{label}: entries {gap} before it are missing (deleted or moved)"
        if entry.seq < expected:
            return (
                f"{label} comes where #{expected} should: an entry was inserted, duplicated or "
                "reordered"
            )
        if entry["prev"] != prev:
            return (
                f"{label} does not link to the entry before it (its prev hash differs): an entry "
                "was inserted, deleted or reordered, or this one was edited"
            )
        alg = entry["alg"]
        if alg == ALG_HMAC:
            if self._key is None:
                return _NEEDS_KEY
            key: bytes | None = self._key
        elif alg == ALG_SHA256:
            if self._key is not None and entry["event"] not in KEYLESS_EVENTS:
                return (
                    f"{label} ({entry['event']}) has no HMAC although the log is verified with a "
                    "key: it was forged, or written by a process without SUDO_QUEUE_AUDIT_KEY"
                )
            key = None
        else:
            return f"{label} has an unknown hash algorithm {alg!r}: it was edited"
        if not hmac.compare_digest(entry_hash(prev, entry.fields, key), entry["hash"]):
            return f"{label} was edited: its content does not match its hash"
        shown_digest = hashlib.sha256(entry["args"].encode()).hexdigest() if entry["args"] else ""
        if shown_digest != entry["redacted_digest"]:
            return f"{label} was edited: its args do not match their digest"
        return ""

    async def _check_checkpoint(self, checkpoint: Checkpoint, result: VerifyResult) -> str:
        head, anchor = result.head, result.anchor
        if checkpoint.count > head.count:
            return (
                f"the log was truncated: the checkpoint records entry #{checkpoint.count} but "
                f"the log ends at #{head.count}"
            )
        if checkpoint.count < anchor.count:
            result.notes.append(
                f"the checkpoint (#{checkpoint.count}) predates the retained entries (from "
                f"#{anchor.count + 1}), so it could not be compared"
            )
            return ""
        if checkpoint.count == head.count:
            stored = head.hash
        elif checkpoint.count == anchor.count:
            stored = anchor.hash
        else:
            stored = ""
            async for entry in self.entries():
                if entry.seq == checkpoint.count:
                    stored = entry["hash"]
                    break
        if not hmac.compare_digest(stored, checkpoint.hash):
            return (
                f"entry #{checkpoint.count} differs from the checkpoint: the history up to it "
                "was rewritten"
            )
        return ""


# -- parsing ---------------------------------------------------------------------------------------

_AGO = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """A moment from ISO 8601 (``2025-01-31T12:00``, UTC unless it says) or a span ago (``2h``)."""
    value = text.strip()
    match = _AGO.fullmatch(value)
    if value and match is not None and any(match.groups()):
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        span = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        return (now or datetime.now(UTC)) - span
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time; write ISO 8601 (2025-01-31T12:00:00Z) or a span ago "
            "such as 30m, 2h, 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def format_table(entries: list[AuditEntry]) -> str:
    """A readable table of entries for `sudo-queue audit list`."""
    rows = [("TIME (UTC)", "#", "EVENT", "REQUEST", "AGENT", "CALL", "RULE", "ACTOR")]
    for e in entries:
        when = e.time
        call = f"{e['resource']}.{e['action']}" if e["resource"] else "-"
        rows.append(
            (
                when.strftime("%Y-%m-%d %H:%M:%S") if when else "?",
                e["seq"],
                e["event"],
                e["request_id"] or "-",
                e["agent"] or "-",
                call,
                e["rule"] or (e["policy_version"] if e["event"] == "policy_reloaded" else "-"),
                e["actor"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
