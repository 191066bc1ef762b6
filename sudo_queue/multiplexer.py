"""One pub/sub connection per process, fanned out to any number of waiting coroutines.

A waiter registers a `Wake` (an event) for a channel and gets it back once Redis has
confirmed the subscription: only then may it read the record (DESIGN.md's subscribe-then-read
order). Every message on the channel sets the events of its waiters and leaves its data in
`Wake.news`; a waiter registered with a key (a Gate's inbox, where a message is '<request id>'
or '<request id> <news>') is set only by the messages carrying its key, so one subscription
serves any number of them. When the connection breaks, the reader opens a new one, subscribes
every channel again, and on the confirmation sets every event and marks it `stale`, so waiters
re-read the records they may have missed news of.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["Listening", "Multiplexer", "Wake"]

log = structlog.get_logger(__name__)

# Silence on the connection longer than this gets a PING; no answer at all within three times
# it means a dead (half-open) connection. One command per interval per process, whatever the
# number of waiters.
PING_INTERVAL_S = 15.0


class Wake:
    """What asyncio.Event gives one waiter, and what set it, until `clear()`.

    `news`: the data of the latest message for this waiter (for a keyed waiter, what follows its
    key and a space; '' when the message is the key alone), or None. `stale`: a subscription was
    confirmed, so news may have been lost and only a read of the truth is up to date.

    Not an asyncio.Event: an Event keeps a deque (over 600 bytes) for its waiters, and each of
    10,000 parked requests keeps a Wake. This one keeps at most one future, made by `wait`.
    """

    __slots__ = ("_future", "_set", "news", "stale")

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None
        self.news: str | None = None
        self.stale = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set, and release whoever waits."""
        self._set = True
        _release(self._future)

    def clear(self) -> None:
        self._set = False
        self.news = None
        self.stale = False

    async def wait(self, timeout: float | None = None) -> bool:
        """Return True once set, or False after `timeout` seconds, whichever comes first.

        One coroutine waits on a Wake at a time (each `listen` gives its own).
        """
        if self._set:
            return True
        if self._future is not None:
            raise RuntimeError("another coroutine is already waiting on this Wake")
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        # A timer rather than asyncio.timeout: no Timeout object and context for each of
        # thousands of parked waiters.
        timer = None if timeout is None else loop.call_later(timeout, _release, future)
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()
        return self._set


def _release(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class _Channel:
    __slots__ = ("confirmed", "keep", "keyed", "waiters")

    def __init__(self) -> None:
        self.waiters: set[Wake] = set()
        # Waiters that only the messages carrying their key wake (a Gate's inbox carries the
        # request id), so one subscription serves any number of them.
        self.keyed: dict[str, list[Wake]] = {}
        self.confirmed = asyncio.Event()
        self.keep = False  # stays subscribed without waiters (an inbox that every request reuses)

    @property
    def idle(self) -> bool:
        return not self.waiters and not self.keyed and not self.keep

    def add(self, wake: Wake, key: str | None) -> None:
        if key is None:
            self.waiters.add(wake)
        else:
            self.keyed.setdefault(key, []).append(wake)

    def discard(self, wake: Wake, key: str | None) -> None:
        if key is None:
            self.waiters.discard(wake)
            return
        wakes = self.keyed.get(key, [])
        if wake in wakes:
            wakes.remove(wake)
        if not wakes:
            self.keyed.pop(key, None)

    def deliver(self, data: str) -> None:
        """Wake the plain waiters with `data`, and the keyed ones whose key starts it."""
        for wake in self.waiters:
            wake.news = data
            wake.set()
        key, _, news = data.partition(" ")
        for wake in self.keyed.get(key, ()):
            wake.news = news
            wake.set()

    def resubscribed(self) -> None:
        """Wake every waiter to re-read: news may have been lost while unsubscribed."""
        for wake in self.waiters:
            wake.stale = True
            wake.set()
        for wakes in self.keyed.values():
            for wake in wakes:
                wake.stale = True
                wake.set()


class Listening:
    """`Multiplexer.listen`'s context manager: a class with slots, not a generator, because
    each of thousands of parked requests keeps one."""

    __slots__ = ("_channel", "_entry", "_key", "_mux", "_wake")

    def __init__(self, mux: Multiplexer, channel: str, key: str | None) -> None:
        self._mux = mux
        self._channel = channel
        self._key = key
        self._wake = Wake()
        self._entry: _Channel | None = None

    async def __aenter__(self) -> Wake:
        if self._entry is not None:
            raise RuntimeError("this listen() is already entered; call listen() again for another")
        self._entry = await self._mux._join(self._channel, self._wake, self._key)
        return self._wake

    async def __aexit__(self, *exc_info: object) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            await self._mux._leave(self._channel, entry, self._wake, self._key)


class Multiplexer:
    """Shares one Redis pub/sub connection among many waiters."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._channels: dict[str, _Channel] = {}
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def listen(self, channel: str, *, key: str | None = None) -> Listening:
        """Subscribe (sharing the connection); `async with` it for a Wake set on every wake-up.

        With `key`, only the channel's messages whose data is `key`, or starts with `key` and a
        space, wake this waiter (and every resubscription, as for all waiters): how many
        requests share a Gate's inbox.
        """
        return Listening(self, channel, key)

    async def _join(self, channel: str, wake: Wake, key: str | None) -> _Channel:
        """Add `wake` to `channel` and wait for Redis to confirm the subscription."""
        if self._closed:
            raise RuntimeError("the multiplexer is closed")
        entry = self._channels.get(channel)
        new = entry is None
        if entry is None:
            entry = self._channels[channel] = _Channel()
        entry.add(wake, key)
        try:
            if new:
                self._start()
                if self._pubsub is not None:
                    await self._send("subscribe", channel)
            await entry.confirmed.wait()
        except BaseException:
            await self._leave(channel, entry, wake, key)
            raise
        return entry

    async def _leave(self, channel: str, entry: _Channel, wake: Wake, key: str | None) -> None:
        entry.discard(wake, key)
        if entry.idle and entry.confirmed.is_set():
            await self._drop(channel, entry)

    async def keep(self, channel: str) -> bool:
        """Keep `channel` subscribed until close; True once Redis has confirmed it.

        The first call subscribes in the background and returns False at once: a caller never
        waits for the subscription, it uses the channel once it is confirmed.
        """
        if self._closed:
            raise RuntimeError("the multiplexer is closed")
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel()
            entry.keep = True
            self._start()
            if self._pubsub is not None:
                await self._send("subscribe", channel)
        entry.keep = True
        return entry.confirmed.is_set()

    async def _drop(self, channel: str, entry: _Channel) -> None:
        if self._channels.get(channel) is entry:
            del self._channels[channel]
            if self._pubsub is not None:
                await self._send("unsubscribe", channel)

    async def _send(self, command: str, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            await getattr(pubsub, command)(channel)
        except (RedisError, OSError) as exc:
            # The reader sees the same broken connection, reconnects and resubscribes.
            log.debug("pubsub_send_failed", command=command, error=str(exc))

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sq-pubsub")

    async def _run(self) -> None:
        delay = 0.05
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                # Connect before other coroutines may send on this PubSub: redis-py opens the
                # connection lazily, and concurrent first sends would each open one of their own
                # (overwriting each other), leaving subscriptions on connections nobody reads.
                await pubsub.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
                self._pubsub = pubsub
                for entry in self._channels.values():
                    entry.confirmed.clear()
                channels = list(self._channels)
                if channels:
                    await pubsub.subscribe(*channels)
                await self._read(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                self._pubsub = None
                self.reconnects += 1
                log.warning("pubsub_reconnecting", error=str(exc) or type(exc).__name__)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while not self._closed:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=PING_INTERVAL_S)
            now = loop.time()
            if message is None:
                if now - last_heard > 3 * PING_INTERVAL_S:
                    raise TimeoutError("no answer on the pub/sub connection; reconnecting")
                await pubsub.ping()
                continue
            last_heard = now
            kind = message["type"]
            channel = message.get("channel")
            if isinstance(channel, bytes):
                channel = channel.decode()
            entry = self._channels.get(channel) if isinstance(channel, str) else None
            if entry is None:
                continue
            if kind == "message":
                data = message.get("data")
                entry.deliver(data.decode() if isinstance(data, bytes) else str(data))
                # The woken waiter goes first: an agent waits for it, nobody waits for this
                # reader's next read (and messages already received are still there).
                await asyncio.sleep(0)
            elif kind == "subscribe":
                entry.confirmed.set()
                # After a reconnect this is the moment news may have been missed: re-read.
                entry.resubscribed()
                if entry.idle:
                    await self._drop(channel, entry)  # type: ignore[arg-type]  # str checked above

    async def aclose(self) -> None:
        """Stop the reader and close the connection; safe to call twice."""
        self._closed = True
        task, self._task = self._task, None
        # Python 3.11's wait_for can swallow a cancel that lands as its inner future completes;
        # cancel again until the reader has really stopped.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
