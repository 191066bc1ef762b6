"""The audit log: one entry per transition, a hash chain that verify checks, tampering caught."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sudo_queue import Gate, RequestDenied, Status
from sudo_queue import audit as audit_module
from sudo_queue import store as store_module
from sudo_queue.audit import (
    GENESIS,
    AuditEntry,
    AuditLog,
    Checkpoint,
    entry_hash,
    hmac_pad_states,
    parse_since,
)
from sudo_queue.models import canonical_json, digest
from sudo_queue.redact import MASK
from sudo_queue.store import Outcome, Store

from .helpers import ROOT, cli_env, stop_process

KEY = "k" * 32
AUDIT = "sq:audit"
HEAD = "sq:audit:head"


# -- helpers ---------------------------------------------------------------------------------------


async def create(
    store: Store, request_id: str, args: Any = None, *, agent: str = "bot", key: str | None = None
) -> str:
    args_json = canonical_json({"amount": 1} if args is None else args)
    await store.create(
        request_id,
        agent=agent,
        resource="stripe",
        action="charge",
        args_json=args_json,
        args_digest=digest(args_json),
        context_json="{}",
        key=key,
    )
    return args_json


async def decide(
    store: Store,
    request_id: str,
    args_json: str,
    status: Status,
    *,
    expires_in_s: float = 60,
    min_approvals: int = 1,
) -> None:
    result = await store.decide(
        request_id,
        status=status,
        agent="bot",
        resource="stripe",
        action="charge",
        args_digest=digest(args_json),
        rule="big-charges",
        reason="charges need a human",
        policy_version="sha256:v1",
        actor="policy",
        expires_in_s=expires_in_s,
        min_approvals=min_approvals,
        args_json=args_json,  # as the worker does: the entry's body digest is passed
    )
    assert result.outcome is Outcome.APPLIED


async def events(redis: Redis, request_id: str | None = None) -> list[str]:
    return [
        f["event"]
        for _, f in await redis.xrange(AUDIT)
        if request_id is None or f["request_id"] == request_id
    ]


async def sample_chain(store: Store, prefix: str = "r") -> None:
    """Nine entries: r1 created, allowed; r2 created, pending, vote, approved; r3 created,
    pending, cancelled."""
    r1, r2, r3 = (f"{prefix}{n}" for n in (1, 2, 3))
    await decide(store, r1, await create(store, r1), Status.ALLOWED)
    await decide(store, r2, await create(store, r2), Status.PENDING)
    await store.approve(r2, actor="alice")
    await decide(store, r3, await create(store, r3), Status.PENDING)
    await store.cancel(r3, actor="bot")


async def rewrite(
    redis: Redis,
    change: Callable[[list[tuple[str, dict[str, str]]]], list[tuple[str, dict[str, str]]]],
) -> list[tuple[str, dict[str, str]]]:
    """Tamper like an attacker with Redis access: rebuild the stream with changed entries."""
    entries = [(i, dict(f)) for i, f in await redis.xrange(AUDIT)]
    changed = change(entries)
    await redis.delete(AUDIT)
    for stream_id, fields in changed:
        await redis.xadd(AUDIT, fields, id=stream_id)
    return entries


def rehash(entries: list[tuple[str, dict[str, str]]], key: bytes | None = None) -> str:
    """Recompute every hash (what an attacker without the key can do); returns the last hash."""
    prev = GENESIS
    for _, fields in entries:
        fields["prev"] = prev
        fields["alg"] = "sha256" if key is None else "hmac-sha256"
        fields["hash"] = prev = entry_hash(prev, fields, key)
    return prev


@pytest.fixture
def audit(fake_redis: Redis) -> AuditLog:
    return AuditLog(fake_redis)


# -- the hash, in Lua, against Python's hashlib and hmac -------------------------------------------


def _lua_block() -> str:
    text = files("sudo_queue").joinpath("transitions.lua").read_text()
    start, end = text.index("-- [sha256 begin]"), text.index("-- [sha256 end]")
    return (
        "local audit_mac = ARGV[2]\n"
        + text[start:end]
        + "if ARGV[1] == 'bit' then return type(bit) end\n"
        # SHA-256 of any message, or HMAC-SHA-256 from the pad states, built from the script's
        # own pieces (the chain step and the body fallback use them).
        + "if audit_mac == '' then return sha256_from(SHA256_INIT, 0, ARGV[3]) end\n"
        + "local inner = sha256_from(hex_words(string.sub(audit_mac, 1, 64)), 64, ARGV[3])\n"
        + "return words_hex(digest_from(hex_words(string.sub(audit_mac, 65, 128)), 64,"
        + " hex_words(inner)))\n"
    )


MESSAGES = [
    b"",
    b"a",
    b"abc",
    b"x" * 55,  # the longest message that fits one block with its padding
    b"x" * 56,  # the shortest that needs a second block
    b"x" * 63,
    b"x" * 64,
    b"x" * 65,
    b"y" * 119,
    b"y" * 120,
    b"z" * 128,
    "héllo wörld ✓ 日本語 🙂".encode() * 9,
    bytes(range(256)) * 3,
    hashlib.sha256(b"seed").digest() * 40,
]


@pytest_asyncio.fixture(params=["fakeredis", "redis-server"])
async def lua_redis(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Redis, str]]:
    """Both Lua environments: fakeredis (no `bit` library) and a real redis-server (`bit`)."""
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
        yield client, "nil"
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
        yield client, "table"
    await client.aclose()


async def test_lua_sha256_equals_hashlib(lua_redis: tuple[Redis, str]) -> None:
    """The script's SHA-256 equals hashlib's at block boundaries, multi-block and non-ASCII."""
    redis, bit_library = lua_redis
    script = redis.register_script(_lua_block())
    assert await script(args=["bit", "", ""]) == bit_library  # the branch under test
    for message in MESSAGES:
        assert await script(args=["hash", "", message]) == hashlib.sha256(message).hexdigest()


async def test_lua_hmac_equals_python_hmac(lua_redis: tuple[Redis, str]) -> None:
    """HMAC-SHA-256 from the key's pad states equals hmac.new for short, 64-byte and long keys."""
    redis, _ = lua_redis
    script = redis.register_script(_lua_block())
    for key in (b"k", b"0123456789abcdef" * 4, b"long key " * 12, os.urandom(32)):
        pads = hmac_pad_states(key)
        for message in MESSAGES:
            expected = hmac.new(key, message, hashlib.sha256).hexdigest()
            assert await script(args=["hash", pads, message]) == expected


# -- entries of the lifecycle ----------------------------------------------------------------------


async def test_every_transition_writes_one_entry_and_the_chain_verifies(
    store: Store, fake_redis: Redis, audit: AuditLog
) -> None:
    """allow, deny, approve (quorum 2), reject, expire and cancel give the expected entries."""
    ids = {name: name for name in ("allow", "deny", "approve", "reject", "expire", "cancel")}
    for request_id in ids:
        await create(store, request_id)
    args = canonical_json({"amount": 1})
    await decide(store, "allow", args, Status.ALLOWED)
    await decide(store, "deny", args, Status.DENIED)
    await decide(store, "approve", args, Status.PENDING, min_approvals=2)
    assert (await store.approve("approve", actor="alice")).outcome is Outcome.VOTED
    assert (await store.approve("approve", actor="alice")).outcome is Outcome.DUPLICATE
    await store.approve("approve", actor="carol")
    await decide(store, "reject", args, Status.PENDING)
    await store.reject("reject", actor="bob", reason="not today")
    await decide(store, "expire", args, Status.PENDING, expires_in_s=0.05)
    await asyncio.sleep(0.1)
    assert (await store.expire("expire")).outcome is Outcome.APPLIED
    await store.cancel("cancel", actor="bot")

    assert await events(fake_redis, "allow") == ["created", "allowed"]
    assert await events(fake_redis, "deny") == ["created", "denied"]
    assert await events(fake_redis, "approve") == ["created", "pending", "vote", "vote", "approved"]
    assert await events(fake_redis, "reject") == ["created", "pending", "rejected"]
    assert await events(fake_redis, "expire") == ["created", "pending", "expired"]
    assert await events(fake_redis, "cancel") == ["created", "cancelled"]

    entries = await audit.list_entries(request_id="approve")
    votes = [e for e in entries if e["event"] == "vote"]
    assert [e["actor"] for e in votes] == ["alice", "carol"]
    approved = entries[-1]
    assert approved["status"] == "approved"
    assert approved["rule"] == "big-charges"
    assert approved["policy_version"] == "sha256:v1"
    assert approved["args_digest"] == digest(args)
    assert approved["agent"] == "bot"
    assert int(approved["time"]) > 0
    rejected = (await audit.list_entries(request_id="reject"))[-1]
    assert (rejected["actor"], rejected["reason"]) == ("bob", "not today")
    assert (await audit.list_entries(request_id="expire"))[-1]["actor"] == "sudo-queue"

    result = await audit.verify()
    assert result.ok, result.problem
    assert result.checked == result.head.count == 17
    assert result.head == await audit.checkpoint()


async def test_writers_pass_the_body_digest_of_every_entry_they_cause(
    store: Store, fake_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each transition's writer names the exact canonical bytes of its entries, so Redis hashes
    only the two-block chain step. Shown by passing a wrong digest for those bytes: the script
    uses it (and verify then rejects the entry), which it does only on an exact match."""
    wrong = hashlib.sha256(b"not the body").hexdigest()
    real = store_module.entry_bodies

    def forged(entries: Any) -> dict[str, str]:
        return dict.fromkeys(real(entries), wrong)

    monkeypatch.setattr(store_module, "entry_bodies", forged)
    args = await create(store, "a")
    await decide(store, "a", args, Status.ALLOWED)
    for request_id in ("b", "c", "d", "e"):
        await create(store, request_id)
        await decide(store, request_id, args, Status.PENDING, expires_in_s=0.05)
    await store.approve("b", actor="alice", reason="ok, token=sk-live-abcdefghijklmnop")
    await store.reject("c", actor="bob")
    await store.cancel("d", actor="bot")
    await asyncio.sleep(0.1)
    await store.expire("e")
    await store.fail("a", actor="policy", rule="<error>", reason="x")  # refused: no entry

    entries = [fields for _, fields in await fake_redis.xrange(AUDIT)]
    assert [f["event"] for f in entries] == [
        "created", "allowed",
        "created", "pending", "created", "pending", "created", "pending", "created", "pending",
        "vote", "approved", "rejected", "cancelled", "expired",
    ]  # fmt: skip
    for fields in entries:
        message = (
            bytes.fromhex(fields["prev"])
            + bytes.fromhex(wrong)
            + int(fields["seq"]).to_bytes(8, "big")
            + int(fields["time"]).to_bytes(8, "big")
        )
        assert fields["hash"] == hashlib.sha256(message).hexdigest(), fields["event"]
    result = await AuditLog(fake_redis).verify()
    assert not result.ok
    assert "#1 " in result.problem
    assert "does not match its hash" in result.problem


async def test_a_digest_for_other_bytes_is_never_used(store: Store, fake_redis: Redis) -> None:
    """The script hashes the body itself unless the digest's key is exactly its own bytes."""
    args = await create(store, "a")
    params = {"verdict": "allowed", "agent": "bot", "resource": "stripe", "action": "charge"}
    params |= {"digest": digest(args), "rule": "r", "reason": "", "policy_version": "v"}
    params |= {"actor": "policy", "expires_in_ms": 0, "approvers": "[]", "min_approvals": 1}
    params |= {"channel": "", "notify": ""}
    near = {"actor": "policy", "event": "allowed", "status": "allowed", "request_id": "a"}
    canonical_text = next(iter(store_module.entry_bodies([near])))
    params["bodies"] = {canonical_text: "f" * 64, "junk": "not hex"}
    assert (await store._run("decide", "a", params))[0] == "applied"
    result = await AuditLog(fake_redis).verify()
    assert result.ok, result.problem
    assert result.checked == 2


async def test_refused_transitions_write_no_entry(store: Store, fake_redis: Redis) -> None:
    """A late click, a double decision or an unknown id changes nothing, the log included."""
    args = await create(store, "r1")
    await decide(store, "r1", args, Status.ALLOWED)
    before = await fake_redis.xlen(AUDIT)
    assert (await store.approve("r1", actor="alice")).outcome is Outcome.REFUSED
    assert (await store.cancel("r1", actor="bot")).outcome is Outcome.REFUSED
    assert (await store.reject("nope", actor="bob")).outcome is Outcome.MISSING
    assert await fake_redis.xlen(AUDIT) == before


async def test_args_are_redacted_but_the_digest_binds_the_real_args(
    store: Store, audit: AuditLog
) -> None:
    """Entries show redacted args; args_digest is over the unredacted args the approval binds."""
    args = {"amount": 5000, "password": "hunter2", "note": "key sk-abcdefghijklmnopqrstuvwxyz12"}
    args_json = await create(store, "r1", args)
    await decide(store, "r1", args_json, Status.PENDING)
    for entry in await audit.list_entries(request_id="r1"):
        shown = json.loads(entry["args"])
        assert shown == {"amount": 5000, "password": MASK, "note": f"key {MASK}"}
        assert entry["args_digest"] == digest(args_json)
        assert entry["redacted_digest"] == digest(entry["args"])
    record = await store.get("r1")
    assert record is not None
    assert record.args == args  # the record keeps the real call


async def test_reasons_are_redacted_and_clipped(store: Store, audit: AuditLog) -> None:
    """A reason with a token is masked; a huge one is clipped without splitting a character."""
    args = await create(store, "r1")
    await decide(store, "r1", args, Status.PENDING)
    await store.reject("r1", actor="bob", reason="no: token=abc123 " + "é" * 3000)
    entry = (await audit.list_entries(request_id="r1"))[-1]
    assert "abc123" not in entry["reason"]
    assert entry["reason"].startswith(f"no: token={MASK} ")
    assert entry["reason"].endswith("...")
    assert len(entry["reason"].encode()) <= 1024 + 3
    assert (await audit.verify()).ok


async def test_policy_patterns_published_in_redis_apply_to_every_writer(
    fake_redis: Redis, audit: AuditLog
) -> None:
    """Redaction keys a worker publishes reach entries written by agents that never saw them."""
    worker = Store(fake_redis)
    agent = Store(fake_redis)
    before = await create(agent, "old", {"ssn": "123-45-6789"})
    assert await worker.publish_policy(
        version="sha256:v2", redact_keys=["SSN"], source="policy.yaml", actor="worker:w1"
    )
    # An agent's Store that still has the old (empty) patterns learns the new ones and retries.
    await create(agent, "new", {"ssn": "987-65-4321"})
    await decide(worker, "old", before, Status.PENDING)

    shown = {(e["request_id"], e["event"]): e["args"] for e in await audit.list_entries()}
    assert json.loads(shown[("old", "created")]) == {"ssn": "123-45-6789"}  # written before
    assert json.loads(shown[("old", "pending")]) == {"ssn": MASK}  # re-redacted since
    assert json.loads(shown[("new", "created")]) == {"ssn": MASK}
    assert agent.redact_keys == ("SSN",)
    assert (await audit.verify()).ok


async def test_policy_reloaded_entry_only_when_the_policy_changes(
    store: Store, fake_redis: Redis, audit: AuditLog
) -> None:
    """Publishing the same policy again is silent; a new version writes one policy_reloaded."""
    publish = {"redact_keys": [], "source": "p.yaml", "actor": "worker:w1"}
    assert await store.publish_policy(version="sha256:a", **publish)
    assert not await store.publish_policy(version="sha256:a", **publish)
    assert await store.publish_policy(version="sha256:b", **publish)
    entries = await audit.list_entries()
    assert [e["event"] for e in entries] == ["policy_reloaded", "policy_reloaded"]
    assert [e["policy_version"] for e in entries] == ["sha256:a", "sha256:b"]
    assert "replaces sha256:a" in entries[1]["reason"]
    assert entries[1]["actor"] == "worker:w1"
    assert (await audit.verify()).ok


async def test_worker_records_a_policy_reload_once(
    fake_redis: Redis, audit: AuditLog, tmp_path: Path
) -> None:
    """The worker writes policy_reloaded when its policy file changes, not on every job."""
    from sudo_queue.workers.policy import PolicyHolder, WorkerContext, publish_policy

    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\ndefault: deny\n")
    holder = PolicyHolder(path)
    store = Store(fake_redis)
    ctx: WorkerContext = {"policy": holder, "store": store}
    await publish_policy(ctx)
    await publish_policy(ctx)
    path.write_text("version: 1\ndefault: deny\nredact:\n  keys: [ssn]\n")
    assert holder.reload()
    await publish_policy(ctx)
    entries = await audit.list_entries()
    assert [e["event"] for e in entries] == ["policy_reloaded", "policy_reloaded"]
    assert entries[1]["policy_version"] == holder.current.version
    assert entries[1]["reason"].endswith('redacted keys: ["ssn"]')
    assert store.redact_keys == ("ssn",)


# -- tampering -------------------------------------------------------------------------------------


def _edit_actor(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    entries[2][1]["actor"] = "mallory"
    return entries


def _edit_args(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    entries[2][1]["args"] = '{"amount":1000000}'
    return entries


def _edit_and_rehash_one(
    entries: list[tuple[str, dict[str, str]]],
) -> list[tuple[str, dict[str, str]]]:
    fields = entries[2][1]
    fields["actor"] = "mallory"
    fields["hash"] = entry_hash(fields["prev"], fields)
    return entries


def _delete_middle(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    return entries[:2] + entries[3:]


def _insert(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    forged = dict(entries[1][1], event="approved", actor="mallory")
    first_ms = entries[1][0].split("-")[0]
    return [*entries[:2], (f"{first_ms}-999", forged), *entries[2:]]


def _reorder(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    (id3, f3), (id4, f4) = entries[2], entries[3]
    return [*entries[:2], (id3, f4), (id4, f3), *entries[4:]]


def _duplicate(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    ms = entries[2][0].split("-")[0]
    return [*entries[:3], (f"{ms}-999", dict(entries[2][1])), *entries[3:]]


@pytest.mark.parametrize(
    ("tamper", "bad_index", "says"),
    [
        (_edit_actor, 2, "was edited"),
        (_edit_args, 2, "args do not match their digest"),
        (_edit_and_rehash_one, 3, "does not link"),
        (_delete_middle, 2, "entries #3 before it are missing (deleted or moved)"),
        (_insert, 2, "comes where #3 should"),
        (_reorder, 2, "entries #3 before it are missing (deleted or moved)"),
        (_duplicate, 3, "comes where #4 should"),
    ],
    ids=["edited", "edited-args", "edited-rehashed", "deleted", "inserted", "reordered", "dup"],
)
async def test_tampering_is_detected_naming_the_first_bad_entry(
    store: Store,
    fake_redis: Redis,
    audit: AuditLog,
    tamper: Callable[[list[tuple[str, dict[str, str]]]], list[tuple[str, dict[str, str]]]],
    bad_index: int,
    says: str,
) -> None:
    """Each kind of tampering fails verify, which names the first entry that is wrong."""
    await sample_chain(store)
    assert (await audit.verify()).ok
    await rewrite(fake_redis, tamper)
    stream_ids = [i for i, _ in await fake_redis.xrange(AUDIT)]
    result = await audit.verify()
    assert not result.ok
    assert says in result.problem
    assert result.bad_entry == stream_ids[bad_index]
    assert stream_ids[bad_index] in result.problem


async def test_deleted_tail_and_entry_added_without_the_head_are_detected(
    store: Store, fake_redis: Redis, audit: AuditLog
) -> None:
    """Deleting the newest entry, or appending one outside a transition, breaks the head."""
    await sample_chain(store)
    last_id = (await fake_redis.xrevrange(AUDIT, count=1))[0][0]
    await fake_redis.xdel(AUDIT, last_id)
    result = await audit.verify()
    assert not result.ok
    assert "the entries after #8 were deleted" in result.problem

    await fake_redis.delete(AUDIT, HEAD)
    await sample_chain(store, prefix="s")
    entries = [(i, dict(f)) for i, f in await fake_redis.xrange(AUDIT)]
    forged = dict(entries[-1][1], seq="10", event="approved", prev=entries[-1][1]["hash"])
    forged["hash"] = entry_hash(forged["prev"], forged)
    await fake_redis.xadd(AUDIT, forged)
    result = await audit.verify()
    assert not result.ok
    assert "entries were added outside sudo-queue" in result.problem


async def test_a_rehashed_history_is_caught_by_a_checkpoint(
    store: Store, fake_redis: Redis, audit: AuditLog
) -> None:
    """Without a key anyone can recompute the chain; a checkpoint kept elsewhere catches it."""
    await sample_chain(store)
    kept = await audit.checkpoint()

    def forge(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
        entries[2][1]["actor"] = "mallory"
        rehash(entries)
        return entries

    entries = await rewrite(fake_redis, forge)
    await fake_redis.hset(HEAD, "hash", entries[-1][1]["hash"])
    assert (await audit.verify()).ok  # self-consistent: this is what a key or checkpoint is for
    result = await audit.verify(checkpoint=kept)
    assert not result.ok
    assert "entry #9 differs from the checkpoint" in result.problem


async def test_a_truncated_tail_is_caught_by_a_checkpoint(
    store: Store, fake_redis: Redis, audit: AuditLog
) -> None:
    """Dropping the newest entries and rolling the head back passes alone, not with a checkpoint."""
    await sample_chain(store)
    kept = await audit.checkpoint()
    assert kept.count == 9
    entries = await fake_redis.xrange(AUDIT)
    await fake_redis.xdel(AUDIT, *[i for i, _ in entries[-2:]])
    await fake_redis.hset(HEAD, mapping={"hash": entries[-3][1]["hash"], "count": "7"})
    assert (await audit.verify()).ok
    result = await audit.verify(checkpoint=kept)
    assert not result.ok
    assert "truncated" in result.problem
    assert (await audit.verify(checkpoint=Checkpoint(entries[3][1]["hash"], 4))).ok


# -- HMAC ------------------------------------------------------------------------------------------


async def test_hmac_chain_needs_the_key_and_resists_rehashing(fake_redis: Redis) -> None:
    """With SUDO_QUEUE_AUDIT_KEY, decisions are HMACs; only the right key verifies them."""
    agent = Store(fake_redis)  # agents hold no key: their created entries are plain SHA-256
    worker = Store(fake_redis, audit_key=KEY)
    args = await create(agent, "r1")
    await decide(worker, "r1", args, Status.PENDING)
    await worker.approve("r1", actor="alice")
    algs = [(f["event"], f["alg"]) for _, f in await fake_redis.xrange(AUDIT)]
    assert algs == [
        ("created", "sha256"),
        ("pending", "hmac-sha256"),
        ("vote", "hmac-sha256"),
        ("approved", "hmac-sha256"),
    ]
    assert (await AuditLog(fake_redis, key=KEY).verify()).ok

    without = await AuditLog(fake_redis).verify()
    assert without.needs_key
    assert "set SUDO_QUEUE_AUDIT_KEY" in without.problem
    wrong = await AuditLog(fake_redis, key="w" * 32).verify()
    assert not wrong.ok
    assert "entry #2" in wrong.problem

    def forge(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
        entries[3][1]["actor"] = "mallory"
        rehash(entries)  # without the key the attacker can only make SHA-256 entries
        return entries

    entries = await rewrite(fake_redis, forge)
    await fake_redis.hset(HEAD, "hash", entries[-1][1]["hash"])
    forged = await AuditLog(fake_redis, key=KEY).verify()
    assert not forged.ok
    assert "entry #2" in forged.problem
    assert "has no HMAC" in forged.problem


async def test_a_decision_written_without_the_key_fails_a_keyed_verify(fake_redis: Redis) -> None:
    """A CLI or worker run without SUDO_QUEUE_AUDIT_KEY is flagged, naming its entry."""
    keyless = Store(fake_redis)
    args = await create(keyless, "r1")
    await decide(Store(fake_redis, audit_key=KEY), "r1", args, Status.PENDING)
    await keyless.approve("r1", actor="alice")
    result = await AuditLog(fake_redis, key=KEY).verify()
    assert not result.ok
    assert "entry #3" in result.problem
    assert "(vote) has no HMAC" in result.problem


# -- retention -------------------------------------------------------------------------------------


async def test_trimming_keeps_the_newest_entries_and_verify_starts_at_the_anchor(
    fake_redis: Redis, audit: AuditLog
) -> None:
    """SUDO_QUEUE_AUDIT_MAXLEN bounds the stream; verify goes on from the last trimmed hash."""
    store = Store(fake_redis, audit_maxlen=5)
    kept_early: Checkpoint | None = None
    for n in range(10):
        await create(store, f"r{n}")
        await store.cancel(f"r{n}", actor="bot")
        if n == 1:
            kept_early = await audit.checkpoint()
    assert await fake_redis.xlen(AUDIT) == 5
    result = await audit.verify()
    assert result.ok, result.problem
    assert (result.checked, result.anchor.count, result.head.count) == (5, 15, 20)
    first = (await fake_redis.xrange(AUDIT, count=1))[0][1]
    assert first["seq"] == "16"
    assert first["prev"] == result.anchor.hash

    assert kept_early is not None
    old = await audit.verify(checkpoint=kept_early)
    assert old.ok
    assert "predates the retained entries" in old.notes[0]

    oldest = (await fake_redis.xrange(AUDIT, count=1))[0][0]
    await fake_redis.xdel(AUDIT, oldest)
    result = await audit.verify()
    assert not result.ok
    assert "entries #16 before it are missing" in result.problem


# -- reading ---------------------------------------------------------------------------------------


async def test_list_filters_by_request_agent_time_and_limit(
    store: Store, fake_redis: Redis, audit: AuditLog
) -> None:
    """list_entries returns the newest matching entries, oldest first."""
    await sample_chain(store)
    await create(store, "other", agent="reporter")
    assert [e["event"] for e in await audit.list_entries(request_id="r2")] == [
        "created",
        "pending",
        "vote",
        "approved",
    ]
    assert [e["request_id"] for e in await audit.list_entries(agent="reporter")] == ["other"]
    newest = await audit.list_entries(limit=2)
    assert [e.seq for e in newest] == [9, 10]
    first = (await fake_redis.xrange(AUDIT, count=1))[0]
    entry = AuditEntry(first[0], first[1])
    assert entry.time is not None
    assert len(await audit.list_entries(since=entry.time, limit=100)) == 10
    assert entry.as_json()["stream_id"] == first[0]


def test_checkpoint_and_since_parsing() -> None:
    """HASH:COUNT and --since values parse; garbage is refused with what to write instead."""
    digest_hex = "ab" * 32
    assert Checkpoint.parse(f"{digest_hex}:12") == Checkpoint(digest_hex, 12)
    assert str(Checkpoint(digest_hex, 12)) == f"{digest_hex}:12"
    for bad in ("", "abc:1", f"{digest_hex}", f"{digest_hex}:x"):
        with pytest.raises(ValueError, match="HASH:COUNT"):
            Checkpoint.parse(bad)
    base = parse_since("2025-01-31T12:00:00+00:00")
    assert parse_since("2h30m", now=base).isoformat() == "2025-01-31T09:30:00+00:00"
    assert parse_since("2025-01-31T12:00").tzinfo is not None
    with pytest.raises(ValueError, match="30m, 2h, 7d"):
        parse_since("yesterday")


# -- real processes on a private redis-server ------------------------------------------------------

POLICY = """\
version: 1
default: deny
redact:
  keys: [ssn]
rules:
  - name: reads
    resource: "db.*"
    action: read
    decision: allow
  - name: never-drop
    resource: postgres
    action: drop_table
    decision: deny
  - name: quick-expiry
    resource: slow
    decision: require_approval
    expires_in: 1s
  - name: big-charges
    resource: stripe
    action: charge
    decision: require_approval
"""


def sq(
    redis_url: str, *args: str, key: str | None = KEY, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`sudo-queue ARGS` in its own process, with SUDO_QUEUE_AUDIT_KEY unless key is None."""
    env = cli_env(redis_url)
    env.pop("SUDO_QUEUE_AUDIT_KEY", None)
    if key is not None:
        env["SUDO_QUEUE_AUDIT_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "sudo_queue", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture
def keyed_worker(redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """A policy worker process holding the audit key; yields its JSON log file."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    log_path = tmp_path / "worker.log"
    env = cli_env(redis_url) | {"SUDO_QUEUE_AUDIT_KEY": KEY, "SUDO_QUEUE_LOG_LEVEL": "debug"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sudo_queue", "worker", "--policy", str(policy)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        yield log_path
    finally:
        assert stop_process(process) == 0, log_path.read_text()[-3000:]


async def until(check: Callable[[], Awaitable[object]], limit: float = 15) -> None:
    async with asyncio.timeout(limit):
        while not await check():  # noqa: ASYNC110  # polling Redis, written by other processes
            await asyncio.sleep(0.02)


async def pending(store: Store, request_id: str) -> bool:
    record = await store.get(request_id)
    return record is not None and record.status is Status.PENDING


@pytest.mark.redis_server
async def test_full_run_with_worker_cli_and_agent_verifies(
    redis_url: str, real_redis: Redis, keyed_worker: Path
) -> None:
    """allow, deny, approve, reject and expire through real processes give a chain that verifies."""
    await until(lambda: real_redis.exists("sq:policy"))
    store = Store(real_redis)
    async with Gate.connect(redis_url, agent="billing-bot") as gate:
        allowed = await gate.request("db.users", "read", {"id": 1}, timeout=10)
        with pytest.raises(RequestDenied) as denied:
            await gate.request("postgres", "drop_table", {"table": "users"}, timeout=10)
        approve_id = await gate.submit("stripe", "charge", {"amount": 5000})
        reject_id = await gate.submit("stripe", "charge", {"amount": 7000})
        expire_id = await gate.submit("slow", "run", {"n": 1})
        for request_id in (approve_id, reject_id):
            await until(lambda request_id=request_id: pending(store, request_id))
        assert sq(redis_url, "approve", approve_id, "--as", "alice").returncode == 0
        assert sq(redis_url, "reject", reject_id, "--as", "bob").returncode == 0
        assert (await gate.wait(approve_id, timeout=10)).status is Status.APPROVED
        with pytest.raises(RequestDenied) as rejected:
            await gate.wait(reject_id, timeout=10)
        with pytest.raises(RequestDenied) as expired:
            await gate.wait(expire_id, timeout=10)
    assert rejected.value.decision.status is Status.REJECTED
    assert expired.value.decision.status is Status.EXPIRED

    expected = {
        allowed.request_id: ["created", "allowed"],
        denied.value.decision.request_id: ["created", "denied"],
        approve_id: ["created", "pending", "vote", "approved"],
        reject_id: ["created", "pending", "rejected"],
        expire_id: ["created", "pending", "expired"],
    }
    for request_id, want in expected.items():
        listed = sq(redis_url, "audit", "list", "--request", request_id, "--json")
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)
        assert [e["event"] for e in entries] == want
        assert entries[-1]["actor"] in ("policy", "alice", "bob", "sudo-queue", "billing-bot")
        assert {e["alg"] for e in entries if e["event"] not in ("created", "expired")} <= {
            "hmac-sha256"
        }
    policy_entries = await AuditLog(real_redis, key=KEY).list_entries(limit=100)
    assert policy_entries[0]["event"] == "policy_reloaded"

    verified = sq(redis_url, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert "audit log intact: 15 entries verified (#1..#15)" in verified.stdout
    no_key = sq(redis_url, "audit", "verify", key=None)
    assert no_key.returncode == 2
    assert "set SUDO_QUEUE_AUDIT_KEY" in no_key.stderr
    table = sq(redis_url, "audit", "list", "--agent", "billing-bot", "--limit", "3")
    assert table.stdout.splitlines()[0].split()[:4] == ["TIME", "(UTC)", "#", "EVENT"]
    assert len(table.stdout.splitlines()) == 4


@pytest.mark.redis_server
async def test_cli_verify_names_the_bad_entry_and_checkpoints_catch_truncation(
    redis_url: str, real_redis: Redis
) -> None:
    """`audit verify` exits 1 naming the entry; `--checkpoint` catches a truncated tail."""
    await sample_chain(Store(real_redis, audit_key=KEY))
    checkpoint = sq(redis_url, "audit", "checkpoint")
    assert checkpoint.returncode == 0
    kept = Checkpoint.parse(checkpoint.stdout)
    assert kept.count == 9
    assert sq(redis_url, "audit", "verify", "--checkpoint", str(kept)).returncode == 0

    exported = sq(redis_url, "audit", "export", "--jsonl")
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["seq"] for line in lines] == [str(n) for n in range(1, 10)]

    entries = await real_redis.xrange(AUDIT)
    await real_redis.xdel(AUDIT, entries[4][0])
    tampered = sq(redis_url, "audit", "verify")
    assert tampered.returncode == 1
    assert entries[5][0] in tampered.stderr
    assert "#5 before it are missing" in tampered.stderr

    await real_redis.delete(AUDIT, HEAD)
    await sample_chain(Store(real_redis, audit_key=KEY), prefix="s")
    kept = Checkpoint.parse(sq(redis_url, "audit", "checkpoint").stdout)
    entries = await real_redis.xrange(AUDIT)
    await real_redis.xdel(AUDIT, entries[-1][0])
    await real_redis.hset(HEAD, mapping={"hash": entries[-2][1]["hash"], "count": "8"})
    assert sq(redis_url, "audit", "verify").returncode == 0
    truncated = sq(redis_url, "audit", "verify", "--checkpoint", str(kept))
    assert truncated.returncode == 1
    assert "truncated" in truncated.stderr
    bad = sq(redis_url, "audit", "verify", "--checkpoint", "nope")
    assert bad.returncode == 2


WRITER = """
import asyncio, sys, uuid
from redis.asyncio import Redis
from sudo_queue.models import canonical_json, digest
from sudo_queue.store import Store

async def main(url, tag, count, maxlen):
    redis = Redis.from_url(url, decode_responses=True)
    store = Store(redis, audit_maxlen=maxlen)
    args = canonical_json({"writer": tag})
    await redis.incr("start")
    while int(await redis.get("start")) < 8:  # a barrier: all writers run at the same time
        await asyncio.sleep(0.005)
    for _ in range(count):
        request_id = uuid.uuid4().hex
        await store.create(request_id, agent=tag, resource="x", action="y", args_json=args,
                           args_digest=digest(args), context_json="{}", key=None)
        await store.cancel(request_id, actor=tag)
    await redis.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


@pytest.mark.redis_server
@pytest.mark.parametrize("maxlen", [0, 300], ids=["unbounded", "trimmed"])
async def test_eight_processes_writing_at_once_keep_one_chain(
    redis_url: str, real_redis: Redis, maxlen: int
) -> None:
    """8 writer processes interleave on one stream; the chain verifies and counts every entry."""
    count = 60
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            redis_url,
            f"w{n}",
            str(count),
            str(maxlen),
            env=cli_env(redis_url),
            cwd=ROOT,
        )
        for n in range(8)
    ]
    try:
        async with asyncio.timeout(60):
            assert [await writer.wait() for writer in writers] == [0] * 8
    finally:
        for writer in writers:
            if writer.returncode is None:
                writer.kill()
                await writer.wait()
    result = await AuditLog(real_redis).verify()
    assert result.ok, result.problem
    assert result.head.count == 8 * count * 2
    assert result.checked == (maxlen or 8 * count * 2)
    agents = [f["agent"] for _, f in await real_redis.xrange(AUDIT)]
    switches = sum(1 for a, b in itertools.pairwise(agents) if a != b)
    assert switches > 16, "the writers did not interleave"


SECRETS = {
    "amount": 5000,
    "password": "hunter2-Secret!",
    "ssn": "123-45-6789",
    "note": "use sk-live-abcdefghijklmnopqrstuvwxyz0123 now",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "session": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9P",
    "headers": {"Authorization": "Bearer abcdef123456789xyz"},
    "deploy_key": (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    ),
}
LEAKS = [
    "hunter2-Secret!",
    "123-45-6789",
    "sk-live-abcdefghij",
    "AKIAIOSFODNN7EXAMPLE",
    "eyJhbGciOiJIUzI1NiJ9",
    "abcdef123456789xyz",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    "approver-token-999",
]


@pytest.mark.redis_server
async def test_no_secret_from_the_payload_reaches_logs_cli_or_the_audit_stream(
    redis_url: str, real_redis: Redis, keyed_worker: Path
) -> None:
    """Secrets in args (and in an approver's reason) appear in no log, CLI output or entry."""
    await until(lambda: real_redis.exists("sq:policy"))
    outputs: list[str] = []
    async with Gate.connect(redis_url, agent="billing-bot") as gate:
        request_id = await gate.submit("stripe", "charge", SECRETS)
        await until(lambda: pending(Store(real_redis), request_id))
        for args in (
            ("pending", "--json"),
            ("pending",),
            ("show", request_id),
            ("show", request_id, "--json"),
            ("approve", request_id, "--as", "alice", "--reason", "ok token=approver-token-999"),
            ("audit", "list", "--json"),
            ("audit", "list"),
            ("audit", "export", "--jsonl"),
        ):
            done = sq(redis_url, *args)
            assert done.returncode == 0, (args, done.stderr)
            outputs += [done.stdout, done.stderr]
        decision = await gate.wait(request_id, timeout=10)
    assert decision.args_digest == digest(canonical_json(SECRETS))  # bound to the real args
    assert json.loads(await real_redis.hget(f"sq:req:{request_id}", "args") or "") == SECRETS
    assert "[REDACTED]" in outputs[0]

    stream = json.dumps(await real_redis.xrange(AUDIT))
    log = await asyncio.to_thread(keyed_worker.read_text)
    assert "request_decided" in log
    for leak in LEAKS:
        assert leak not in stream, leak
        assert leak not in log, leak
        for output in outputs:
            assert leak not in output, leak


@pytest.mark.parametrize("key", [None, KEY.encode()])
async def test_lua_chain_step_equals_python(
    lua_redis: tuple[Redis, str], key: bytes | None
) -> None:
    """The script's word-level chain step is `entry_hash` of format 2, in both Lua runtimes."""
    client, _ = lua_redis
    text = files("sudo_queue").joinpath("transitions.lua").read_text()
    start, end = text.index("-- [sha256 begin]"), text.index("-- [sha256 end]")
    script = (
        "local audit_mac = ARGV[1]\n"
        + text[start:end]
        + "return chain_step(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))\n"
    )
    fields = {"v": "2", "event": "allowed", "request_id": "r1", "actor": "policy"}
    body = hashlib.sha256(audit_module.canonical(fields)).hexdigest()
    mac = hmac_pad_states(key) if key else ""
    for prev, seq, time in [
        (GENESIS, 1, 0),
        (hashlib.sha256(b"p").hexdigest(), 2**40 + 7, 1763712345678),
    ]:
        expected = entry_hash(prev, {**fields, "seq": str(seq), "time": str(time)}, key)
        assert await client.eval(script, 0, mac, prev, body, seq, time) == expected
