"""The consumer's pub/sub on a Redis Cluster: SSUBSCRIBE on the master of each channel's slot (I/O).

A broker on a cluster publishes each frame with ``SPUBLISH`` (sharded pub/sub) on the master
owning its channel's slot, and only that master's subscribers hear it; so a consumer needs a
connection to every master owning a slot of a channel it wants. :class:`ShardedSubscriber` is
:class:`consumers.subscriber.Subscriber` for a ``redis+cluster://`` URL, with the interface and
the promises the client relies on (``consumers.client``):

- It reads the slot map (``CLUSTER SLOTS`` from the first node that answers,
  ``broker.resp.RespAddress.slot_map``), opens one :class:`~consumers.raw_link.RawLink` per
  master owning a wanted channel's slot, SSUBSCRIBEs the sharded channels there, one command per
  slot (Redis refuses one naming channels of several slots: ``-CROSSSLOT``), and SUBSCRIBEs the
  classic channels (the broker's ``{ns}:events``, which a cluster forwards to every node) on the
  master of their own slot. Which channels are sharded the caller says (``sharded``).
- **A fault stays on its link.** A link that breaks (EOF, reset, an unanswered PING), a
  ``sunsubscribe`` Redis sends unasked (a slot of ours moved: a failover, a resharding) and a
  redirection or ``-CLUSTERDOWN`` answering a subscribe (our map was old) end that link only
  (``consumers.raw_link.SlotMoved``): the other links keep delivering, untouched. The broken
  link's channels (the events channel among them, if it was there) are subscribed again from a
  fresh slot map, retried with backoff until every one of them has a master that confirmed it
  (a failover: once the replica is promoted). They go wherever their slots are now, on the links
  already open when their master has one (a new SSUBSCRIBE per slot), on a new link otherwise.
  The map is asked of the node a redirection named (or, for an unasked ``sunsubscribe``, the
  node that sent it: it knows its slots before the others hear of it), then of the masters last
  seen (those still linked first), then of the URL's nodes.
- **One incident, one report.** A break reports ``on_break`` when it happens and one
  :class:`~consumers.subscriber.Break` (``on_restored``) once every channel it cost is subscribed
  again, so the client emits one gap. A link that breaks while an incident is still open (two
  masters failing over at once, a slot moved during a failover) joins it: one ``on_break``, one
  :class:`Break` spanning both, from the earliest start to when the last channel is back. A
  channel subscribed while live whose master cannot be reached (or whose slot has none in the
  map) opens an incident too (it starts then: nothing of it was ever delivered), or joins the
  open one; so does one whose master is a link lost in the open incident (it waits for the
  repair). A link without channels of ours that breaks costs nothing and reports nothing;
  nor does a break before the first subscription completed (``wait_connected``): that
  subscription simply goes on, as ``Subscriber`` retries its first connect.
- A channel subscribed while live goes to the link of its master, which is opened if there is
  none; a link left without channels stays open (a PING per quiet interval) until it breaks.
- Messages are handed on from ``data_received``, as on the raw road of ``Subscriber``: no
  ``await`` per message; a break only moves the lost link's channels aside.
- What the client and the gateway read: ``live`` is True while every desired channel is on an
  open link and no incident is open (False during a partial outage, although the other links
  deliver: a health check should say degraded); ``wait_connected`` returns once every channel
  was subscribed once; ``channels`` is the desired set, lost channels included; ``where`` the
  cluster URL.

A :class:`Break` is classified as ``Subscriber`` classifies it, by the link that broke (the
first one, when several joined the incident): its node closed the connection (EOF, reset:
``CLIENT KILL``, the pub/sub output-buffer limit) and the same server (``INFO`` ``run_id``)
answers there after the repair: ``fell-behind``; anything else (a node gone, a PING unanswered,
a slot moved, a master that could not be reached) ``consumer-disconnected``. ``server_changed``
says that a channel of the incident is served by another server than before (a failover
promoted a replica, a resharding moved its slot). ``since_ms`` is the last message the broken
link received (or that message's own timestamp, if earlier), the earliest of them in a merged
incident; ``until_ms`` when the last channel of the incident was confirmed again. The gap
covers every channel of the client (``Break`` does not name channels): on the links that stayed
up it announces more than was lost, never less.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.clock import now_ms
from broker.cluster_slots import SlotMap, key_slot, parse_redirect
from broker.errors import ConfigError, describe
from broker.redis_url import parse_cluster_url
from broker.resp import ClusterDownError
from broker.settings import redact_url
from consumers.items import CONSUMER_DISCONNECTED, FELL_BEHIND, gap_start_ms
from consumers.raw_link import RawAddress, RawLink, ServerClosed, SlotMoved, raw_address
from consumers.subscriber import Break, run_id_of

logger = logging.getLogger(__name__)

#: SUBSCRIBE at most this many channels per command (as ``consumers.subscriber``)
_CHUNK = 500
#: what a link's watcher may end with that is a break (anything else is a bug, raised by run)
_BREAKS = (RedisError, OSError, TimeoutError, ServerClosed)

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
        the commands per master (:func:`node_commands`), and the channels whose slot has no
        master in ``slots``.
    """
    by_master: dict[int, list[bytes]] = {}
    unowned: list[bytes] = []
    for channel in channels:
        master = slots.owner[key_slot(channel)]
        if master < 0:
            unowned.append(channel)
        else:
            by_master.setdefault(master, []).append(channel)
    plan = {
        slots.masters[master]: node_commands(names, sharded, leave=leave)
        for master, names in sorted(by_master.items())
    }
    return plan, unowned


def node_commands(
    channels: Iterable[bytes], sharded: Callable[[bytes], bool], *, leave: bool = False
) -> Commands:
    """The commands that subscribe ``channels`` (``leave``: unsubscribe them) on one master:
    its classic channels in one SUBSCRIBE first, then one SSUBSCRIBE per slot, in slot order."""
    shard_command, classic_command = (
        (b"SUNSUBSCRIBE", b"UNSUBSCRIBE") if leave else (b"SSUBSCRIBE", b"SUBSCRIBE")
    )
    by_slot: dict[int, list[bytes]] = {}
    classic: list[bytes] = []
    for channel in channels:
        if sharded(channel):
            by_slot.setdefault(key_slot(channel), []).append(channel)
        else:
            classic.append(channel)
    commands: Commands = [(classic_command, classic)] if classic else []
    commands += [(shard_command, names) for _slot, names in sorted(by_slot.items())]
    return commands


#: where a channel is served: (its master, that server's run_id)
_Placement = dict[bytes, tuple[Node, str | None]]


@dataclass(frozen=True, slots=True)
class _Cause:
    """The link whose break opened an incident, as its classification needs it."""

    node: Node
    run_id: str | None
    server_closed: bool  # Redis closed it (EOF, reset), not a PING unanswered or a slot moved


class _Incident:
    """Channels lost since a break, until every one is subscribed again (pure).

    Opened by the first loss; later losses :meth:`join` it until it is reported.
    """

    def __init__(
        self, since_ms: int, error: str, cause: _Cause | None, placement: _Placement
    ) -> None:
        self.since_ms = since_ms
        self.errors = [error]
        #: the first broken link (None: a subscribe that could not reach a master)
        self.cause = cause
        #: where each channel it cost was served before
        self.placement = dict(placement)
        #: masters whose link broke in it: a channel the map puts there waits for the repair
        self.nodes = {cause.node} if cause is not None else set()
        self.attempts = 0

    def join(self, since_ms: int, error: str, cause: _Cause | None, placement: _Placement) -> None:
        """Add a later loss: the gap starts at the earliest, the first cause classifies it."""
        self.since_ms = min(self.since_ms, since_ms)
        if error not in self.errors:
            self.errors.append(error)
        for channel, before in placement.items():
            self.placement.setdefault(channel, before)
        if cause is not None:
            self.nodes.add(cause.node)
            if self.cause is None:
                self.cause = cause

    def report(self, until_ms: int, serving: _Placement, run_ids: dict[Node, str | None]) -> Break:
        """The :class:`Break` to report once repaired: ``serving`` says where each channel is
        served now, ``run_ids`` the server of each link open now."""
        cause = self.cause
        same_server = (
            cause is not None
            and cause.run_id is not None
            and cause.node in run_ids
            and run_ids[cause.node] == cause.run_id
        )
        server_changed = any(
            _moved(before, serving[channel])
            for channel, before in self.placement.items()
            if channel in serving
        )
        return Break(
            reason=FELL_BEHIND
            if same_server and cause is not None and cause.server_closed
            else CONSUMER_DISCONNECTED,
            since_ms=self.since_ms,
            until_ms=until_ms,
            error="; ".join(self.errors),
            attempts=max(self.attempts, 1),
            server_changed=server_changed,
        )


def _moved(before: tuple[Node, str | None], after: tuple[Node, str | None]) -> bool:
    (node, run_id), (new_node, new_run_id) = before, after
    return node != new_node or (
        run_id is not None and new_run_id is not None and run_id != new_run_id
    )


def _redirected_to(error: BaseException, default_host: str) -> Node | None:
    """The node a ``-MOVED``/``-ASK`` named in ``error`` (a :class:`SlotMoved`), if any."""
    text = str(error)
    for kind in ("MOVED ", "ASK "):
        at = text.find(kind)
        if at >= 0 and (redirect := parse_redirect(text[at:], default_host)) is not None:
            return (redirect.host, redirect.port)
    return None


class _Link:
    """One master's link, and what a break of it is judged by."""

    __slots__ = (
        "desired",
        "last_data",
        "last_rx_ms",
        "link",
        "node",
        "on_message",
        "run_id",
        "watcher",
    )

    link: RawLink
    watcher: asyncio.Task[None]

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
        return gap_start_ms(self.last_rx_ms, self.last_data)


def _where(node: Node) -> str:
    return f"{node[0]}:{node[1]}"


def _ignore_confirmation(channel: bytes, subscribed: bool) -> None:
    """Confirmations are read from ``RawLink.subscribed`` (``wait_subscribed``)."""


#: a link and the channels just sent to it; channels that could not be sent, and why
_Joined = list[tuple[_Link, list[bytes]]]
_Failed = list[tuple[list[bytes], BaseException]]


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
        on_break: called when an incident starts (a link with channels of ours broke, or a
            channel could not be subscribed while live), before its channels are subscribed
            again; not again for a loss that joins the open incident.
        on_restored: awaited once every channel of the incident is subscribed again.
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
        #: the open links, one per master (a broken one leaves at once)
        self._links: dict[Node, _Link] = {}
        #: the master each channel was sent to, on an open link (confirmed or on its way):
        #: a desired channel not in here is lost, and the repair subscribes it
        self._placed: dict[bytes, Node] = {}
        self._opening: dict[Node, asyncio.Lock] = {}  # one link per master, however many ask
        self._watchers: set[asyncio.Task[None]] = set()  # one per open link
        #: the last slot map read (None: none yet)
        self._slots: SlotMap | None = None
        self._incident: _Incident | None = None
        #: set when a channel is lost (or a watcher failed with a bug): the repair has work
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None  # a watcher's bug, raised by run()
        self._running = False
        self._closed = False
        self._connected = asyncio.Event()
        #: the masters of the last slot map (asked after the linked ones)
        self._known: tuple[Node, ...] = ()
        #: the node to ask for the next map first (a redirection named it, or it said a slot
        #: of ours moved)
        self._ask_first: Node | None = None

    # -- public -----------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """True while every desired channel is subscribed (sent to its master's open link)
        and no incident is open: False while a link's channels are being subscribed again,
        although the other links deliver all along (the client's gap says what was lost)."""
        return (
            self._running
            and self._connected.is_set()
            and self._incident is None
            and not self._missing()
        )

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
        """The desired channels, subscribed now or being subscribed again."""
        return frozenset(self._desired)

    async def wait_connected(self, timeout: float) -> None:
        """Wait until every channel was subscribed once (every channel desired when the first
        subscription completes); raises ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def subscribe(self, channels: Iterable[bytes]) -> None:
        """Add channels; once connected, return when Redis confirmed every one of them that
        could be sent to its master.

        Before the first subscription completes this only records them (it subscribes them).
        A channel whose master is being repaired, or cannot be reached, is left to the repair
        and reported with its incident (module docstring); this returns without it.

        Raises:
            TimeoutError: Redis did not confirm within ``confirm_timeout``.
        """
        new = [c for c in channels if c not in self._desired]
        self._desired.update(new)
        slots = self._slots
        if not new or not self._running or not self._connected.is_set() or slots is None:
            return
        incident = self._incident
        if incident is not None:
            # the map names a master whose link broke: its slots may have moved, it may be
            # dead; the repair reads a fresh map for these
            repaired = {
                c
                for c in new
                if (node := slots.node_of(key_slot(c))) in incident.nodes
                and node not in self._links
            }
            if repaired:
                self._wake.set()
                new = [c for c in new if c not in repaired]
        joined, failed = await self._join(new, slots)
        for names, exc in failed:
            where = f"{len(names)} channel(s)"
            self._lost(now_ms(), f"subscribing {where}: {describe(exc)}", None, {})
        try:
            async with asyncio.timeout(self._confirm_timeout):
                for link, names in joined:
                    await link.link.wait_subscribed(names)
        except TimeoutError:
            raise TimeoutError(
                f"redis did not confirm SSUBSCRIBE within {self._confirm_timeout}s"
            ) from None
        except (RedisError, OSError):
            return  # that link broke: its channels are subscribed again with its incident

    async def unsubscribe(self, channels: Iterable[bytes]) -> None:
        """Drop channels (Redis' confirmation is not awaited; late messages are ignored)."""
        gone = [c for c in channels if c in self._desired]
        self._desired.difference_update(gone)
        by_node: dict[Node, list[bytes]] = {}
        for channel in gone:
            node = self._placed.pop(channel, None)
            if node is not None:
                by_node.setdefault(node, []).append(channel)
        for node, names in by_node.items():
            link = self._links.get(node)
            if link is None:
                continue
            try:
                for command, group in node_commands(names, self._sharded, leave=True):
                    link.link.send_chunked(command, group, _CHUNK)
            except (RedisError, OSError):
                continue  # that link is broken: its watcher drops it

    async def run(self) -> None:
        """Subscribe every channel, then repair each break (module docstring); until
        cancelled. Every link is closed when it returns."""
        self._running = True
        try:
            while True:
                await self._repair()
                if not self._missing():
                    # nothing awaited since the check: a loss from now on sets it again
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            self._running = False
            self._close_links()

    async def aclose(self) -> None:
        """Close every link (call after cancelling :meth:`run`)."""
        self._closed = True
        self._close_links()
        if self._watchers:  # ours and cancelled: wait for them (they end at once)
            await asyncio.wait(list(self._watchers))

    # -- internals --------------------------------------------------------------------------

    def _missing(self) -> set[bytes]:
        """The desired channels on no open link (lost, or never subscribed yet)."""
        return self._desired.difference(self._placed)

    async def _repair(self) -> None:
        """Subscribe every missing channel from a fresh map, with backoff, until none is
        missing; then report the incident (the first time: say connected)."""
        delay = self._backoff_initial
        failures = 0
        while missing := sorted(self._missing()):
            self._raise_failure()
            if self._incident is not None:
                self._incident.attempts += 1
            try:
                await self._attempt(missing)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    logger.warning(
                        "sharded pubsub: subscribing %d channel(s) on %s failed (%s); "
                        "retrying in %.2fs",
                        len(missing),
                        self._url,
                        describe(exc),
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
        self._raise_failure()
        # nothing awaited since the last check: every desired channel is on an open link
        self._ask_first = None
        self._connected.set()
        incident, self._incident = self._incident, None
        if incident is None:
            return
        serving = {
            channel: (node, link.run_id)
            for channel, node in self._placed.items()
            if (link := self._links.get(node)) is not None
        }
        run_ids = {node: link.run_id for node, link in self._links.items()}
        report = incident.report(now_ms(), serving, run_ids)
        logger.info(
            "sharded pubsub subscribed again after %d attempt(s); %s",
            report.attempts,
            report.reason,
        )
        if self._on_restored is not None:
            await self._on_restored(report)

    async def _attempt(self, missing: list[bytes]) -> None:
        """Read the slot map, send each channel of ``missing`` to its master and wait for the
        confirmations.

        Raises:
            ClusterDownError: no node gave a map, or a channel's slot has no master in it.
            redis.exceptions.RedisError, OSError: a master could not be reached, or its link
                broke (its watcher reports that).
            TimeoutError: a confirmation did not come in time (those channels are missing
                again).
        """
        # each node asked is given connect_timeout (to connect, then to answer): no timeout
        # over all of them, which a dead first node would spend before a live one is asked
        slots = await self._map_source().slot_map()
        self._slots = slots
        self._known = slots.masters
        joined, failed = await self._join(missing, slots)
        try:
            async with asyncio.timeout(self._confirm_timeout):
                for link, names in joined:
                    try:
                        await link.link.wait_subscribed(names)
                    except (RedisError, OSError) as exc:  # it broke: its channels left with it
                        failed.append((names, exc))
        except TimeoutError:
            for link, names in joined:  # sent but not confirmed: try them again
                for channel in names:
                    if (
                        channel not in link.link.subscribed
                        and self._placed.get(channel) == link.node
                    ):
                        del self._placed[channel]
            raise TimeoutError(
                f"redis did not confirm SSUBSCRIBE within {self._confirm_timeout}s"
            ) from None
        if failed:
            left = sum(len(names) for names, _ in failed)
            raise RedisConnectionError(
                f"{left} channel(s) not subscribed: {describe(failed[0][1])}"
            )

    def _map_source(self) -> RawAddress:
        """The address whose nodes are asked for the slot map, in order (module docstring)."""
        route = self._address.cluster
        assert route is not None  # checked in __init__
        first = (self._ask_first,) if self._ask_first is not None else ()
        nodes = tuple(dict.fromkeys((*first, *self._links, *self._known, *route.nodes)))
        return replace(self._address, cluster=replace(route, nodes=nodes))

    async def _join(self, channels: list[bytes], slots: SlotMap) -> tuple[_Joined, _Failed]:
        """Send the commands subscribing ``channels`` on their masters by ``slots``, opening
        the links missing (at once); returns each link with the channels sent to it, and the
        channels that could not be sent, with why."""
        plan, unowned = plan_commands(slots, channels, self._sharded)
        failed: _Failed = []
        if unowned:
            why = f"no master serves the slot of {unowned[0]!r} (the cluster is not whole)"
            failed.append((unowned, ClusterDownError(why)))
        nodes = list(plan)
        opened = await asyncio.gather(*(self._link_to(n) for n in nodes), return_exceptions=True)
        joined: _Joined = []
        for node, link in zip(nodes, opened, strict=True):
            commands = plan[node]
            if isinstance(link, BaseException):
                if not isinstance(link, RedisError | OSError | TimeoutError):
                    raise link
                failed.append(([c for _, names in commands for c in names], link))
                continue
            # only what is still wanted and on no link: the awaits above let subscribe(),
            # unsubscribe() and a repair run
            sent: list[bytes] = []
            try:
                for command, names in commands:
                    group = [c for c in names if c in self._desired and c not in self._placed]
                    if group:
                        link.link.send_chunked(command, group, _CHUNK)
                        sent += group
            except (RedisError, OSError) as exc:  # the link broke (its watcher drops it)
                failed.append(([c for _, names in commands for c in names], exc))
                continue
            # a write succeeded, so the link is not lost and still the node's: its break,
            # whenever it comes, finds these channels here
            self._placed.update(dict.fromkeys(sent, node))
            if sent:
                joined.append((link, sent))
        return joined, failed

    async def _link_to(self, node: Node) -> _Link:
        """The open link to ``node``, opened (and watched) if there is none."""
        async with self._opening.setdefault(node, asyncio.Lock()):
            link = self._links.get(node)
            if link is not None:
                return link
            link = _Link(node, self._desired, self._on_message)
            async with asyncio.timeout(self._connect_timeout * 2):
                link.link, info = await RawLink.open(
                    self._address.node(*node),
                    self._name,
                    info=True,
                    deliver=link.deliver,
                    confirm=_ignore_confirmation,
                )
            if self._closed or not self._running:  # closed while this link was being opened
                link.link.close()
                raise RedisConnectionError("the subscriber is closed")
            link.run_id = run_id_of(info)  # None without INFO (an ACL without +info)
            self._links[node] = link
            link.watcher = asyncio.create_task(
                link.link.watch(self._ping_interval), name=f"{self._name}:watch:{_where(node)}"
            )
            self._watchers.add(link.watcher)
            link.watcher.add_done_callback(functools.partial(self._watched, link))
            return link

    def _watched(self, link: _Link, task: asyncio.Task[None]) -> None:
        self._watchers.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._broke(link, exc)

    def _broke(self, link: _Link, exc: BaseException) -> None:
        """``link`` broke: drop it, its channels are lost (an incident opens or grows)."""
        if self._links.get(link.node) is not link:
            return  # closed by this client
        del self._links[link.node]
        link.link.close()
        lost = sorted(c for c, node in self._placed.items() if node == link.node)
        for channel in lost:
            del self._placed[channel]
        self._wake.set()
        if not isinstance(exc, _BREAKS):
            self._failure = exc  # a bug, not a break: run() raises it
            return
        if isinstance(exc, SlotMoved):
            self._ask_first = _redirected_to(exc, link.node[0]) or link.node
        error = f"{_where(link.node)}: {describe(exc)}"
        if not lost or not self._connected.is_set():
            # nothing of ours there, or not connected yet (the first subscription goes on)
            logger.info("sharded pubsub link to %s lost: %s", _where(link.node), error)
            return
        cause = _Cause(link.node, link.run_id, isinstance(exc, ServerClosed))
        placement = dict.fromkeys(lost, (link.node, link.run_id))
        self._lost(link.since_ms(), error, cause, placement)

    def _lost(self, since_ms: int, error: str, cause: _Cause | None, placement: _Placement) -> None:
        """Channels are lost: open an incident (report ``on_break``), or join the open one."""
        self._wake.set()
        incident = self._incident
        if incident is not None:
            incident.join(since_ms, error, cause, placement)
            logger.warning("sharded pubsub lost %s too; subscribing its channels again", error)
            return
        self._incident = _Incident(since_ms, error, cause, placement)
        logger.warning("sharded pubsub lost %s; subscribing its channels again", error)
        if self._on_break is not None:
            self._on_break(error)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _close_links(self) -> None:
        """Close every link and cancel its watcher (``aclose`` waits for them)."""
        links = list(self._links.values())
        self._links.clear()
        self._placed.clear()
        for link in links:
            link.watcher.cancel()
            link.link.close()


__all__ = ["ShardedSubscriber", "node_commands", "plan_commands"]
