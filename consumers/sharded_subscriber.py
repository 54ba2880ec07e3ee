"""The consumer's pub/sub on a Redis Cluster: SSUBSCRIBE on the master of each channel's slot (I/O).

A broker on a cluster publishes each frame with ``SPUBLISH`` (sharded pub/sub) on the master
owning its channel's slot, and only that master's subscribers hear it; so a consumer needs a
connection to every master owning a slot of a channel it wants. :class:`ShardedSubscriber` is
:class:`consumers.subscriber.Subscriber` for a ``redis+cluster://`` URL, with the interface and
the promises the client relies on (``consumers.client``):

- Each connect reads the slot map afresh (``CLUSTER SLOTS`` from the first node that answers,
  ``broker.resp.RespAddress.slot_map``: the URL's nodes, then the masters of the last map, so a
  URL naming one node survives that node; after a slot moved, the node that said so first: it
  knows its slots before the others hear of it), opens one :class:`~consumers.raw_link.RawLink`
  per master owning a wanted channel's slot, SSUBSCRIBEs the sharded channels there, one command
  per slot (Redis refuses one naming channels of several slots: ``-CROSSSLOT``), and SUBSCRIBEs
  the classic channels (the broker's ``{ns}:events``, which a cluster forwards to every node) on
  the master of their own slot. Which channels are sharded the caller says (``sharded``).
- The subscription is one, however many links carry it: a link that breaks (EOF, reset, an
  unanswered PING), a ``sunsubscribe`` Redis sends unasked (a slot of ours moved: a failover, a
  resharding) and a redirection answering a SSUBSCRIBE (our map was old) all end every link
  (``consumers.raw_link.SlotMoved``). One break is reported (``on_break``); the loop reconnects
  with backoff from a fresh map, subscribes everything again and then reports one
  :class:`~consumers.subscriber.Break` (``on_restored``), so the client emits one gap.
- A channel subscribed while live whose master has no link yet gets one; a link left without
  channels stays until the next reconnect (it costs a PING per quiet interval).
- Messages are handed on from ``data_received``, as on the raw road of ``Subscriber``: no
  ``await`` per message.

The break is classified as ``Subscriber`` classifies it: the broken link's node closed the
connection (EOF, reset: ``CLIENT KILL``, the pub/sub output-buffer limit) and the same server
(``INFO`` ``run_id``) answers there after the reconnect: ``fell-behind``; anything else (a node
gone, a PING unanswered, a slot moved) ``consumer-disconnected``. ``server_changed`` says that
a channel is served by another server than before (a failover promoted a replica, a resharding
moved its slot). The gap starts at the last message the broken link received (or that message's
own timestamp, if earlier): the other links were whole until this client closed them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.clock import now_ms
from broker.cluster_slots import SlotMap, key_slot
from broker.errors import ConfigError, describe
from broker.redis_url import parse_cluster_url
from broker.resp import ClusterDownError
from broker.settings import redact_url
from consumers.items import CONSUMER_DISCONNECTED, FELL_BEHIND, frame_time_ms
from consumers.raw_link import RawAddress, RawLink, ServerClosed, SlotMoved, raw_address
from consumers.subscriber import Break, run_id_of

logger = logging.getLogger(__name__)

#: SUBSCRIBE at most this many channels per command (as ``consumers.subscriber``)
_CHUNK = 500

#: a master, as ``CLUSTER SLOTS`` names it: (host, port)
Node = tuple[str, int]
#: what to send one master: (command, its channels), in order
Commands = list[tuple[bytes, list[bytes]]]


def plan_commands(
    slots: SlotMap,
    channels: Iterable[bytes],
    sharded: Callable[[bytes], bool],
    *,
    leave: bool = False,
) -> tuple[dict[Node, Commands], list[bytes]]:
    """The commands that subscribe ``channels`` (``leave``: unsubscribe them), per master.

    Each channel goes to the master of its slot: a sharded one in a SSUBSCRIBE (SUNSUBSCRIBE)
    of its slot's channels alone, a classic one in that master's SUBSCRIBE (UNSUBSCRIBE).

    Returns:
        the commands per master (classic first, then one per slot in slot order), and the
        channels whose slot has no master in ``slots``.
    """
    shard_command, classic_command = (
        (b"SUNSUBSCRIBE", b"UNSUBSCRIBE") if leave else (b"SSUBSCRIBE", b"SUBSCRIBE")
    )
    by_slot: dict[tuple[int, int], list[bytes]] = {}  # (master index, slot) -> channels
    classic: dict[int, list[bytes]] = {}  # master index -> channels
    unowned: list[bytes] = []
    for channel in channels:
        slot = key_slot(channel)
        master = slots.owner[slot]
        if master < 0:
            unowned.append(channel)
        elif sharded(channel):
            by_slot.setdefault((master, slot), []).append(channel)
        else:
            classic.setdefault(master, []).append(channel)
    plan: dict[Node, Commands] = {}
    for master, names in sorted(classic.items()):
        plan.setdefault(slots.masters[master], []).append((classic_command, names))
    for (master, _slot), names in sorted(by_slot.items()):
        plan.setdefault(slots.masters[master], []).append((shard_command, names))
    return plan, unowned


class _Link:
    """One master's link in a session, and what a break of it is judged by."""

    __slots__ = ("desired", "last_data", "last_rx_ms", "link", "node", "on_message", "run_id")

    link: RawLink

    def __init__(
        self, node: Node, desired: set[bytes], on_message: Callable[[bytes, bytes, int], None]
    ) -> None:
        self.node = node
        self.desired = desired  # the subscriber's own set: it filters late messages
        self.on_message = on_message
        self.run_id: str | None = None
        self.last_rx_ms = now_ms()
        self.last_data: bytes | None = None

    def deliver(self, channel: bytes, data: bytes, received_ms: int) -> None:
        # the hot path, called from the link's data_received: as Subscriber._deliver
        self.last_rx_ms = received_ms
        self.last_data = data
        if channel in self.desired:
            try:
                self.on_message(channel, data, received_ms)
            except Exception:  # a bug downstream must not stop the reader
                logger.exception("message handler failed on %r", channel)

    def since_ms(self) -> int:
        """When the last message before a break of this link was published, at the latest
        (as ``Subscriber``: its own timestamp bounds a late-read message better)."""
        stamp = frame_time_ms(self.last_data)
        return self.last_rx_ms if stamp is None else min(self.last_rx_ms, stamp)


#: where a channel was subscribed: (its master, that server's run_id)
_Placement = dict[bytes, tuple[Node, str | None]]


class _Session:
    """The links of one connect, from one slot map; ends as a whole at the first failure."""

    def __init__(self, slots: SlotMap) -> None:
        self.slots = slots
        self.links: dict[Node, _Link] = {}
        #: the first failure: (the link it came from, None: no link yet; what it was)
        self.failed: asyncio.Future[tuple[_Link | None, BaseException]] = (
            asyncio.get_running_loop().create_future()
        )
        self.opening = asyncio.Lock()  # one link per master, however many subscribe at once
        #: the master each channel was sent to (still there after Redis dropped it)
        self.placed: dict[bytes, Node] = {}
        self.closed = False
        self._watchers: set[asyncio.Task[None]] = set()

    def add(self, link: _Link, ping_interval: float, name: str) -> None:
        """Keep ``link`` and watch it (a break of it fails the session)."""
        self.links[link.node] = link
        watcher = asyncio.create_task(link.link.watch(ping_interval), name=f"{name}:watch")
        self._watchers.add(watcher)

        def watched(task: asyncio.Task[None]) -> None:
            self._watchers.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                self.fail(link, exc)

        watcher.add_done_callback(watched)

    def fail(self, link: _Link | None, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_result((link, exc))

    def subscribed(self) -> set[bytes]:
        return set().union(*(link.link.subscribed for link in self.links.values()))

    def placement(self) -> _Placement:
        return {
            channel: (node, link.run_id)
            for channel, node in self.placed.items()
            if (link := self.links.get(node)) is not None
        }

    async def close(self) -> None:
        self.closed = True
        watchers = list(self._watchers)
        for watcher in watchers:
            watcher.cancel()
        if watchers:  # ours and cancelled: wait for them (they end at once)
            await asyncio.wait(watchers)
        for link in self.links.values():
            link.link.close()


@dataclass(frozen=True, slots=True)
class _Broken:
    """A session's failure, kept to classify it once the next session is up."""

    since_ms: int
    error: str
    server_closed: bool
    node: Node | None
    run_id: str | None
    placement: _Placement

    def incident(self, session: _Session, attempts: int) -> Break:
        """The :class:`Break` to report, ``session`` being the one that replaced it."""
        now = session.links.get(self.node) if self.node is not None else None
        same_server = self.run_id is not None and now is not None and now.run_id == self.run_id
        placement = session.placement()
        server_changed = any(
            _moved(before, placement[channel])
            for channel, before in self.placement.items()
            if channel in placement
        )
        return Break(
            reason=FELL_BEHIND if same_server and self.server_closed else CONSUMER_DISCONNECTED,
            since_ms=self.since_ms,
            until_ms=now_ms(),
            error=self.error,
            attempts=attempts,
            server_changed=server_changed,
        )


def _moved(before: tuple[Node, str | None], after: tuple[Node, str | None]) -> bool:
    (node, run_id), (new_node, new_run_id) = before, after
    return node != new_node or (
        run_id is not None and new_run_id is not None and run_id != new_run_id
    )


class ShardedSubscriber:
    """SSUBSCRIBE (and SUBSCRIBE) to a changing set of channels of a Redis Cluster and hand each
    message to ``on_message``; as :class:`consumers.subscriber.Subscriber` (module docstring).

    Args:
        redis_url: the cluster, ``redis+cluster://[user:password@]h1:p1,h2:p2``.
        name: ``CLIENT SETNAME`` of every link.
        on_message: called with ``(channel, data, received_ms)`` for each message, in the
            link's ``data_received``; it must be quick (it only enqueues).
        sharded: whether a channel is sharded (SSUBSCRIBE: the broker's data channels) or
            classic (SUBSCRIBE: its events channel).
        on_break: called when the subscription is lost (before reconnecting).
        on_restored: awaited once every channel is subscribed again.
        ping_interval: a link with nothing received for this long is PINGed; no answer within
            another interval means it is dead.

    Raises:
        ConfigError: not a cluster URL (``RedisUrlError``), or one the raw road cannot honour
            (``consumers.raw_link.raw_address``: a user without a password, options it cannot
            express).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        name: str,
        on_message: Callable[[bytes, bytes, int], None],
        sharded: Callable[[bytes], bool],
        on_break: Callable[[str], None] | None = None,
        on_restored: Callable[[Break], Awaitable[None]] | None = None,
        connect_timeout: float = 5.0,
        ping_interval: float = 5.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        confirm_timeout: float = 5.0,
    ) -> None:
        parse_cluster_url(redis_url)  # a malformed URL is named as such
        address = raw_address(redis_url)
        if address is None or address.cluster is None:
            raise ConfigError(
                f"cannot subscribe on the cluster {redact_url(redis_url)}: its pub/sub takes "
                "raw RESP connections, which need hiredis and, with a user name, a password"
            )
        self._address: RawAddress = replace(address, connect_timeout=connect_timeout)
        self._name = name[:128]
        self._url = redact_url(redis_url)
        self._on_message = on_message
        self._sharded = sharded
        self._on_break = on_break
        self._on_restored = on_restored
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._confirm_timeout = confirm_timeout
        self._desired: set[bytes] = set()
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future[bool]]] = {}
        self._session: _Session | None = None
        self._live = False
        self._connected = asyncio.Event()
        #: the masters of the last slot map (asked after the URL's nodes)
        self._known: tuple[Node, ...] = ()
        #: the node to ask for the next map first (it said a slot of ours moved)
        self._ask_first: Node | None = None

    # -- public -----------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """True while every desired channel is subscribed on a link of the current map."""
        return self._live

    @property
    def raw(self) -> bool:
        """Always True: a cluster is only subscribed to over raw RESP (``consumers.raw_link``)."""
        return True

    @property
    def where(self) -> str:
        """The cluster URL (redacted)."""
        return self._url

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset(self._desired)

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the first connect has every channel subscribed; raises ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def subscribe(self, channels: Iterable[bytes]) -> None:
        """Add channels; when connected, return once Redis confirmed every one of them.

        While disconnected this only records them: the reconnect subscribes them.

        Raises:
            TimeoutError: Redis did not confirm within ``confirm_timeout``.
        """
        new = [c for c in channels if c not in self._desired]
        self._desired.update(new)
        session = self._session
        if not new or not self._live or session is None:
            return
        loop = asyncio.get_running_loop()
        futures = []
        for channel in new:
            fut: asyncio.Future[bool] = loop.create_future()
            self._waiters.setdefault(channel, []).append(fut)
            futures.append(fut)
        try:
            await self._join(session, new)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            # a master unreachable, a slot without one, a link that broke: the subscription
            # is broken as a whole, and the reconnect subscribes these with the rest
            session.fail(None, exc)
            return
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.gather(*futures)
        except TimeoutError:
            raise TimeoutError(
                f"redis did not confirm SSUBSCRIBE within {self._confirm_timeout}s"
            ) from None

    async def unsubscribe(self, channels: Iterable[bytes]) -> None:
        """Drop channels (Redis' confirmation is not awaited; late messages are ignored)."""
        gone = [c for c in channels if c in self._desired]
        self._desired.difference_update(gone)
        session = self._session
        if not gone or not self._live or session is None:
            return
        for channel in gone:
            session.placed.pop(channel, None)
        plan, _unowned = plan_commands(session.slots, gone, self._sharded, leave=True)
        for node, commands in plan.items():
            link = session.links.get(node)
            if link is None:
                continue
            try:
                for command, names in commands:
                    link.link.send_chunked(command, names, _CHUNK)
            except (RedisError, OSError):
                continue  # that link is broken: its watcher ends the session

    async def run(self) -> None:
        """Connect, watch every link, and on any failure reconnect with backoff; until
        cancelled."""
        broken: _Broken | None = None
        attempts = 0
        delay = self._backoff_initial
        while True:
            attempts += 1
            try:
                session = await self._connect()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if attempts == 1 or attempts % 20 == 0:
                    logger.warning(
                        "sharded pubsub connect to %s failed (%s); retrying in %.2fs",
                        self._url,
                        describe(exc),
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            try:
                if broken is not None:
                    incident = broken.incident(session, attempts)
                    logger.info(
                        "sharded pubsub reconnected after %d attempt(s); %s",
                        attempts,
                        incident.reason,
                    )
                    if self._on_restored is not None:
                        await self._on_restored(incident)
                broken = None
                attempts = 0
                delay = self._backoff_initial
                link, failure = await session.failed
                if not isinstance(failure, RedisError | OSError | TimeoutError | ServerClosed):
                    raise failure  # a bug, not a break
                error = describe(failure)
                moved = isinstance(failure, SlotMoved) and link is not None
                self._ask_first = link.node if moved and link is not None else None
                broken = _Broken(
                    since_ms=link.since_ms() if link is not None else now_ms(),
                    error=error,
                    server_closed=isinstance(failure, ServerClosed),
                    node=link.node if link is not None else None,
                    run_id=link.run_id if link is not None else None,
                    placement=session.placement(),
                )
                where = f"{link.node[0]}:{link.node[1]}" if link is not None else self._url
                logger.warning(
                    "sharded pubsub on %s lost: %s; subscribing every channel again", where, error
                )
                if self._on_break is not None:
                    self._on_break(error)
            finally:
                self._drop_session(session)
                await session.close()

    async def aclose(self) -> None:
        """Close every link (call after cancelling :meth:`run`)."""
        session = self._session
        if session is not None:
            self._drop_session(session)
            await session.close()

    # -- internals --------------------------------------------------------------------------

    async def _connect(self) -> _Session:
        """Read the slot map and subscribe every desired channel on its master."""
        # each node asked is given connect_timeout (to connect, then to answer): no timeout
        # over all of them, which a dead first node would spend before a live one is asked
        slots = await self._map_source().slot_map()
        session = _Session(slots)
        try:
            # a subscribe() meanwhile only records its channel (not live yet), so loop until
            # what is subscribed covers what is desired, with no await after the check
            while missing := sorted(self._desired - session.subscribed()):
                joined = await self._join(session, missing)
                async with asyncio.timeout(self._confirm_timeout):
                    for link, names in joined:
                        await link.link.wait_subscribed(names)
            if session.failed.done():  # a link broke after its channels were confirmed
                _, exc = session.failed.result()
                raise RedisConnectionError(describe(exc))
        except BaseException:
            await session.close()
            raise
        self._session = session
        self._confirmed = session.subscribed()
        self._live = True
        self._known = slots.masters
        self._ask_first = None
        self._connected.set()
        return session

    def _map_source(self) -> RawAddress:
        """The address whose nodes are asked for the slot map, in order (module docstring)."""
        route = self._address.cluster
        assert route is not None  # checked in __init__
        first = (self._ask_first,) if self._ask_first is not None else ()
        nodes = tuple(dict.fromkeys((*first, *route.nodes, *self._known)))
        return replace(self._address, cluster=replace(route, nodes=nodes))

    async def _join(
        self, session: _Session, channels: list[bytes]
    ) -> list[tuple[_Link, list[bytes]]]:
        """Send the commands subscribing ``channels`` on their masters, opening the links
        missing; returns each link with the channels it was sent.

        Raises:
            ClusterDownError: a channel's slot has no master in the session's map.
            redis.exceptions.RedisError, OSError, TimeoutError: a link could not be opened, or
                is broken.
        """
        plan, unowned = plan_commands(session.slots, channels, self._sharded)
        if unowned:
            raise ClusterDownError(
                f"no master serves the slot of {unowned[0]!r} (the cluster is not whole)"
            )
        joined = []
        for node, commands in plan.items():
            link = await self._link_to(session, node)
            names: list[bytes] = []
            for command, group in commands:
                link.link.send_chunked(command, group, _CHUNK)
                names += group
            session.placed.update(dict.fromkeys(names, node))
            joined.append((link, names))
        return joined

    async def _link_to(self, session: _Session, node: Node) -> _Link:
        """The session's link to ``node``, opened if it has none."""
        async with session.opening:
            link = session.links.get(node)
            if link is not None:
                return link
            link = _Link(node, self._desired, self._on_message)
            async with asyncio.timeout(self._connect_timeout * 2):
                link.link, info = await RawLink.open(
                    self._address.node(*node),
                    self._name,
                    info=True,
                    deliver=link.deliver,
                    confirm=self._on_confirm,
                )
            if session.closed:  # the session ended while this link was being opened
                link.link.close()
                raise RedisConnectionError("the subscription broke meanwhile")
            link.run_id = run_id_of(info)  # None without INFO (an ACL without +info)
            session.add(link, self._ping_interval, self._name)
            return link

    def _on_confirm(self, channel: bytes, subscribed: bool) -> None:
        if not subscribed:
            self._confirmed.discard(channel)
            return
        self._confirmed.add(channel)
        for fut in self._waiters.pop(channel, ()):
            if not fut.done():
                fut.set_result(True)

    def _drop_session(self, session: _Session) -> None:
        if self._session is not session:
            return
        self._session = None
        self._live = False
        self._confirmed = set()
        # waiters return: the channels stay desired and the reconnect subscribes them
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(False)
        self._waiters.clear()


__all__ = ["ShardedSubscriber", "plan_commands"]
