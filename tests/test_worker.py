"""The policy worker's job functions, called as arq calls them (fakeredis store)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from arq import Retry
from redis.asyncio import Redis

from sudo_queue import store as store_module
from sudo_queue.audit import AuditLog
from sudo_queue.constants import POLICY_ACTOR
from sudo_queue.models import Status, canonical_json, digest
from sudo_queue.store import Store
from sudo_queue.workers import policy as worker
from sudo_queue.workers.runner import json_dumps, json_loads

from .helpers import POLICY


def make_ctx(store: Store, job_try: int = 1, policy_path: Path = POLICY) -> worker.WorkerContext:
    config = worker.WorkerConfig(redis_url="redis://unused", policy_path=policy_path)
    return {
        "store": store,
        "policy": worker.PolicyHolder(policy_path),
        "config": config,
        "job_try": job_try,
    }


async def submit(store: Store, args: object) -> list[str]:
    """Create a request the way the Gate does and return its evaluation job's args."""
    args_json = canonical_json(args)
    await store.create(
        "r1",
        agent="bot",
        resource="stripe",
        action="charge",
        args_json=args_json,
        args_digest=digest(args_json),
        context_json="{}",
        key=None,
    )
    raw = await store.redis.get("arq:job:sq-eval:r1")
    job = json_loads(raw)
    assert job["f"] == "evaluate"
    return list(job["a"][1:])


async def test_evaluate_allows_denies_and_parks(store: Store) -> None:
    """The job decides by the policy: a small charge is allowed with the rule and version."""
    job_args = await submit(store, {"amount": 10})
    ctx = make_ctx(store)
    assert await worker.evaluate(ctx, "r1", *job_args) == "applied"
    record = await store.get("r1")
    assert record is not None
    assert (record.status, record.rule, record.decided_by) == (
        Status.ALLOWED,
        "small-charges",
        POLICY_ACTOR,
    )
    assert record.policy_version == ctx["policy"].current.version


async def test_the_job_carries_the_redacted_digest_the_decide_entry_needs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluation job holds the stored digest of the redacted args, and with it the worker
    names its decision entry's exact canonical bytes without redacting the args again. Shown
    by a wrong digest for those bytes: the script uses it (only an exact match is used), and
    the args are never redacted on the way."""
    ctx = make_ctx(store)
    await worker.publish_policy(ctx)  # as a worker does when it starts
    job_args = await submit(store, {"amount": 10, "api_key": "sk-live-abcdefghijklmnop"})
    record = await store.redis.hget("sq:req:r1", "redacted_digest")
    assert job_args[-1] == record
    wrong = hashlib.sha256(b"not the body").hexdigest()
    real = store_module.entry_bodies
    monkeypatch.setattr(
        store_module, "entry_bodies", lambda entries: dict.fromkeys(real(entries), wrong)
    )

    def no_redaction(*_: object) -> None:
        raise AssertionError("the decide redacted the args again")

    monkeypatch.setattr(Store, "redacted_args", no_redaction)
    assert await worker.evaluate(ctx, "r1", *job_args) == "applied"

    allowed = (await store.redis.xrange("sq:audit"))[-1][1]
    assert allowed["event"] == "allowed"
    message = (
        bytes.fromhex(allowed["prev"])
        + bytes.fromhex(wrong)
        + int(allowed["seq"]).to_bytes(8, "big")
        + int(allowed["time"]).to_bytes(8, "big")
    )
    assert allowed["hash"] == hashlib.sha256(message).hexdigest()


@pytest.mark.parametrize("redacted_digest", [None, "0" * 64], ids=["earlier-job", "wrong"])
async def test_a_job_without_or_with_a_wrong_redacted_digest_still_verifies(
    store: Store, redacted_digest: str | None
) -> None:
    """A job enqueued by an earlier version (no digest) or one whose digest is wrong: the
    worker decides as before and the audit log verifies (the script hashes the body itself)."""
    job_args = await submit(store, {"amount": 10})
    job_args = job_args[:-1] if redacted_digest is None else [*job_args[:-1], redacted_digest]
    assert await worker.evaluate(make_ctx(store), "r1", *job_args) == "applied"
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.ALLOWED
    result = await AuditLog(store.redis).verify()
    assert result.ok, result.problem
    events = [fields["event"] for _, fields in await store.redis.xrange("sq:audit")]
    assert events == ["created", "policy_reloaded", "allowed"]
    assert result.checked == 3


async def test_second_delivery_changes_nothing(store: Store) -> None:
    """arq's at-least-once delivery: running the same job twice decides once."""
    job_args = await submit(store, {"amount": 5000})
    ctx = make_ctx(store)
    assert await worker.evaluate(ctx, "r1", *job_args) == "applied"
    assert await worker.evaluate(ctx, "r1", *job_args) == "refused"
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.PENDING


async def test_condition_error_fails_closed(store: Store) -> None:
    """args without the key a condition reads are denied, naming the rule."""
    job_args = await submit(store, {"currency": "usd"})
    await worker.evaluate(make_ctx(store), "r1", *job_args)
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.DENIED
    assert "small-charges" in (record.reason or "")


async def test_tampered_job_args_are_denied(store: Store) -> None:
    """A job whose args do not match their digest is denied, never evaluated as given."""
    job_args = await submit(store, {"amount": 5000})
    job_args[3] = json.dumps({"amount": 1})
    await worker.evaluate(make_ctx(store), "r1", *job_args)
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.DENIED
    assert "do not match their digest" in (record.reason or "")


async def test_last_try_denies_without_evaluating(store: Store) -> None:
    """After earlier tries died (a crash), the last try denies instead of evaluating again."""
    job_args = await submit(store, {"amount": 10})
    assert await worker.evaluate(make_ctx(store, job_try=worker.MAX_TRIES), "r1", *job_args) == (
        "abandoned"
    )
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.DENIED
    assert "did not complete" in (record.reason or "")


async def test_redis_trouble_retries_then_denies() -> None:
    """A store that cannot reach Redis makes arq retry; the last try gives up (fail closed)."""
    dead = Store(Redis(port=1, socket_connect_timeout=0.2))
    job_args = ["bot", "stripe", "charge", "{}", "{}", digest("{}")]
    with pytest.raises(Retry):
        await worker.evaluate(make_ctx(dead, job_try=1), "r1", *job_args)
    await dead.redis.aclose()


async def test_expire_job_defers_until_due(store: Store) -> None:
    """The expire job retries until the server-clock deadline, then expires the request."""
    job_args = await submit(store, {"amount": 5000})
    await worker.evaluate(make_ctx(store), "r1", *job_args)
    with pytest.raises(Retry):
        await worker.expire(make_ctx(store), "r1")
    await store.redis.hset("sq:req:r1", "expires_at", "1")
    assert await worker.expire(make_ctx(store), "r1") == "applied"
    record = await store.get("r1")
    assert record is not None
    assert record.status is Status.EXPIRED


async def test_sweep_recovers_lost_jobs_and_overdue_requests(store: Store) -> None:
    """The sweeper re-enqueues a queued request whose job vanished and expires overdue ones."""
    await submit(store, {"amount": 10})
    await store.redis.delete("arq:job:sq-eval:r1")
    await store.redis.zadd("sq:queued", {"r1": 0})
    result = await worker.sweep(make_ctx(store))
    assert result["requeued"] == 1
    assert await store.redis.exists("arq:job:sq-eval:r1")


async def test_policy_reload_keeps_last_good(tmp_path: Path) -> None:
    """An invalid policy file on reload is refused; the last good policy stays in force."""
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\ndefault: allow\n")
    holder = worker.PolicyHolder(path)
    good = holder.current.version
    path.write_text("version: 1\ndefault: perhaps\n")
    assert holder.reload() is False
    assert holder.current.version == good
    path.write_text("version: 1\ndefault: deny\n")
    await asyncio.sleep(0)
    assert holder.reload() is True
    assert holder.current.version != good


def test_jobs_are_json_never_pickle() -> None:
    """The job serializer writes JSON and the deserializer refuses a pickle."""
    import pickle

    assert json_loads(json_dumps({"a": [1]})) == {"a": [1]}
    with pytest.raises(UnicodeDecodeError):
        json_loads(pickle.dumps({"a": 1}))
