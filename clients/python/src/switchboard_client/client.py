"""The thin client: WebRTC data channels between two peers when they work, Matrix when they don't,
and every message delivered to the application exactly once and in order either way (the Python
counterpart of the Rust ``switchboard::client``; wire format in docs/protocol.md).

Matrix is the base layer: the client runs its own ``/sync`` and sends its own to-device messages,
so it keeps working with Switchboard down or absent. One driver task owns every peer's delivery
state (:mod:`.reliable`, sans-IO); the sync loop, the signalling socket and the data channels feed
it and wake it. Policies as the Rust client's: :meth:`Client.open` makes this side the caller
(again after a channel dies, with capped backoff); invites from any Raiden address are answered;
signals travel only through Switchboard's socket (``m.call.*`` in our own ``/sync`` are ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp

from . import codec
from .clock import Clock, SystemClock
from .identity import InvalidAddress, address_of_user, parse_address
from .matrix import HomeserverError, MatrixClient, MatrixError, ToDeviceEvent, base_url
from .reliable import DcState, Full, Limits, Peer, ToDevice, TooLarge, generate_stream_id
from .rtc import PeerLink, RtcError, new_call_id
from .signal import IncomingSignal, SignalConnection, SignalError, Unauthorized

log = logging.getLogger("switchboard_client")

DC_POLL_BYTES = 64 * 1024
CALL_TIMEOUT = 30.0
BUFFERED_HIGH = 1024 * 1024
WRITE_STALL = 5.0
SMALL_FRAME = 2 * 1024
LINK_SIGNALS = 64
EARLY_SIGNALS = 64
HELD_SIGNALS_FOR = 30.0
CALL_EVENTS = (
    "m.call.invite",
    "m.call.answer",
    "m.call.candidates",
    "m.call.select_answer",
    "m.call.negotiate",
    "m.call.hangup",
    "m.call.reject",
)


class ClientError(Exception):
    """Base of the client's errors."""


class ClientStopped(ClientError):
    """The client has stopped."""


class Busy(ClientError):
    """Too many sends wait for room to this peer, or too many peers."""


class MessageTooLarge(ClientError):
    """A message larger than the whole replay buffer."""


class ConfigError(ClientError):
    """The configuration is not usable (the Rust client's ``ClientError::Config``)."""


@dataclass
class Backoff:
    initial: float = 1.0
    maximum: float = 30.0

    def next(self, previous: float | None) -> float:
        wait = self.initial if previous is None else previous * 2
        return min(max(wait, self.initial), self.maximum)


@dataclass
class ClientConfig:
    """How a :class:`Client` is set up; the defaults are the Rust client's."""

    homeserver: str
    access_token: str = field(repr=False)
    switchboard: str | None = None
    """Switchboard's client base URL; None: discovered from the homeserver's well-known."""
    relay_only: bool = False
    limits: Limits = field(default_factory=Limits)
    sync_timeout: float = 30.0
    events_capacity: int = 1024
    max_peers: int = 10_000
    max_waiting_sends: int = 1024
    max_held_bytes: int = 64 * 1024 * 1024
    """Bytes held for incoming messages not yet delivered (out-of-order fragments, messages being
    reassembled), across all peers, at most. Each peer is bounded by :class:`Limits` (4 MiB out of
    order, 4 MiB per message); this bounds their sum. Past it, the peers holding the most let go
    of everything they held undelivered, largest first (``IncomingCounters.sheds``; their senders
    send it again). At least ``limits.max_message_bytes + limits.reorder_buffer_bytes``
    (:meth:`Client.connect` raises :class:`ConfigError` otherwise). Default 64 MiB."""
    upgrade_backoff: Backoff = field(default_factory=Backoff)
    reconnect_backoff: Backoff = field(default_factory=Backoff)
    matrix_backoff: Backoff = field(default_factory=Backoff)
    clock: Clock = field(default_factory=SystemClock, repr=False)
    """Where the client reads the time and waits (backoffs, timeouts, the delivery layer's timers).
    Default: the system's; tests pass a :class:`~switchboard_client.clock.ManualClock`."""


@dataclass(frozen=True)
class Presence:
    address: str
    reachable: bool
    users: list[dict[str, Any]]


@dataclass(frozen=True)
class ChannelUp:
    address: str
    path: str  # "relay" or "direct"


@dataclass(frozen=True)
class ChannelDown:
    address: str
    reason: str


@dataclass(frozen=True)
class Message:
    address: str
    data: bytes


@dataclass(frozen=True)
class SwitchboardConnection:
    connected: bool


@dataclass(frozen=True)
class SyncStopped:
    reason: str


ClientEvent = Presence | ChannelUp | ChannelDown | Message | SwitchboardConnection | SyncStopped


@dataclass
class PeerStats:
    dc_state: DcState
    path: str | None
    channels_up: int
    calls: int
    dc_data_frames: int
    matrix_batches: int
    matrix_lines: int
    matrix_acks: int
    rtt: float | None


@dataclass
class _Link:
    call_id: str
    caller: bool
    started: float
    rtc: PeerLink | None = None
    signals_in: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=lambda: asyncio.Queue(LINK_SIGNALS))
    task: asyncio.Task[None] | None = None
    open: bool = False
    path: str | None = None
    announced: float | None = None
    progress: float = 0.0


@dataclass
class _PeerState:
    address: str
    user_id: str
    reliable: Peer
    link: _Link | None = None
    wanted: bool = False
    retry_at: float | None = None
    backoff: float | None = None
    matrix_busy: bool = False
    matrix_retry_at: float | None = None
    matrix_backoff: float | None = None
    waiting: deque[tuple[bytes, asyncio.Future[None]]] = field(default_factory=deque)
    # An invite (and its call's next signals) that came while Switchboard was not connected.
    held: list[tuple[float, IncomingSignal]] = field(default_factory=list)
    channels_up: int = 0
    calls: int = 0
    dc_data_frames: int = 0
    matrix_batches: int = 0
    matrix_lines: int = 0
    matrix_acks: int = 0
    held_bytes: int = 0
    """This peer's share of ``Client._held_bytes``, as last accounted."""


class Client:
    """A running client. Use :meth:`connect`, then ``async for event in client.events()``."""

    def __init__(self, config: ClientConfig, session: aiohttp.ClientSession, matrix: MatrixClient) -> None:
        self.config = config
        self._clock = config.clock
        self._session = session
        self._matrix = matrix
        self.user_id = ""
        self._device_id = "PYTHON"
        self._server_name = ""
        self._peers: dict[str, _PeerState] = {}
        # Bytes held for undelivered incoming messages across peers (bounded by max_held_bytes).
        self._held_bytes = 0
        self._watched: set[str] = set()
        self._outbox: deque[ClientEvent] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_room = asyncio.Event()
        self._wake = asyncio.Event()
        self._conn: SignalConnection | None = None
        self._switchboard_url = config.switchboard
        self._first_sync = asyncio.Event()
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"Client(user_id={self.user_id!r})"

    @classmethod
    async def connect(cls, config: ClientConfig) -> Client:
        """Checks the token (``whoami``), handles the first ``/sync``, then runs; Switchboard is
        connected in the background (discovered from the well-known when not configured). Raises
        :class:`ConfigError`, before any request, for a ``max_held_bytes`` below one peer's
        bounds."""
        needed = config.limits.max_message_bytes + config.limits.reorder_buffer_bytes
        if config.max_held_bytes < needed:
            # One peer may rightly hold this much; below it, a large message could never complete.
            raise ConfigError(
                f"max_held_bytes ({config.max_held_bytes}) is below one peer's "
                f"max_message_bytes + reorder_buffer_bytes ({needed})"
            )
        session = aiohttp.ClientSession()
        try:
            matrix = MatrixClient(session, base_url(config.homeserver), config.access_token, clock=config.clock)
            client = cls(config, session, matrix)
            answer = await matrix._with_retry("GET", "/_matrix/client/v3/account/whoami")
            client.user_id = str(answer.get("user_id"))
            client._device_id = str(answer.get("device_id") or "PYTHON")
            client._server_name = client.user_id.split(":", 1)[1]
        except BaseException:
            await session.close()
            raise
        client._spawn(client._sync_loop())
        try:
            await asyncio.wait_for(client._first_sync.wait(), 60.0)
        except TimeoutError as error:
            await client.shutdown()
            raise ClientError("no first /sync within 60 s") from error
        client._spawn(client._signal_loop())
        client._spawn(client._run())
        return client

    # ---------------------------------------------------------------- public API

    async def events(self) -> AsyncIterator[ClientEvent]:
        """The client's events, in order; ends when the client has stopped."""
        while True:
            while self._outbox:
                event = self._outbox.popleft()
                if len(self._outbox) < self.config.events_capacity:
                    self._outbox_room.set()
                yield event
            if self._stopped:
                return
            self._outbox_ready.clear()
            await self._outbox_ready.wait()

    async def next_event(self, timeout: float | None = None) -> ClientEvent:
        """The next event (raises TimeoutError after ``timeout`` seconds, ClientStopped at the end)."""

        async def first() -> ClientEvent:
            async for event in self.events():
                return event
            raise ClientStopped

        return await asyncio.wait_for(first(), timeout)

    async def watch(self, address: str) -> None:
        """Presence of ``address`` comes as :class:`Presence` events (while on Switchboard)."""
        checksummed = self._address(address)
        self._watched.add(checksummed)
        if self._conn is not None and not self._conn.closed:
            with contextlib.suppress(SignalError):
                await self._conn.watch([checksummed])

    async def open(self, address: str) -> None:
        """Makes this side the caller towards ``address``: a data channel is wanted."""
        peer = self._peer(self._address(address))
        peer.wanted = True
        peer.retry_at = None
        self._wake.set()

    async def close(self, address: str) -> None:
        """No channel wanted to ``address`` any more; an open one is hung up."""
        peer = self._peers.get(self._address(address))
        if peer is not None:
            peer.wanted = False
            peer.retry_at = None
            peer.backoff = None
            self._drop_link(peer, self._clock.monotonic(), "closed", hangup=True)
            self._wake.set()

    async def reset_channel(self, address: str) -> None:
        """Drops the data channel silently, as a failure would (tests, and a stuck channel)."""
        peer = self._peers.get(self._address(address))
        if peer is not None:
            now = self._clock.monotonic()
            self._drop_link(peer, now, "reset", hangup=False)
            self._schedule_retry(peer, now)
            self._wake.set()

    async def send(self, address: str, data: bytes) -> None:
        """Queues ``data`` for ``address``; waits while its replay buffer is full (backpressure)."""
        if self._stopped:
            raise ClientStopped
        peer = self._peer(self._address(address))
        limit = self.config.limits.replay_buffer_bytes
        if len(data) > limit:
            raise MessageTooLarge(f"message of {len(data)} bytes is larger than the replay buffer ({limit})")
        if not peer.waiting and peer.reliable.has_room(len(data)):
            self._push(peer, bytes(data))
            self._wake.set()
            return
        if len(peer.waiting) >= self.config.max_waiting_sends:
            raise Busy("too many sends waiting for room")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        peer.waiting.append((bytes(data), future))
        self._wake.set()
        await future

    def stats(self, address: str) -> PeerStats | None:
        peer = self._peers.get(self._address(address))
        if peer is None:
            return None
        return PeerStats(
            dc_state=peer.reliable.dc_state(self._clock.monotonic()),
            path=peer.link.path if peer.link and peer.link.open else None,
            channels_up=peer.channels_up,
            calls=peer.calls,
            dc_data_frames=peer.dc_data_frames,
            matrix_batches=peer.matrix_batches,
            matrix_lines=peer.matrix_lines,
            matrix_acks=peer.matrix_acks,
            rtt=peer.reliable.rtt(),
        )

    def buffered_fragments(self, address: str) -> int:
        """Fragments to ``address`` not yet acknowledged (the replay buffer)."""
        peer = self._peers.get(self._address(address))
        return len(peer.reliable.outgoing.buffer) if peer is not None else 0

    async def shutdown(self) -> None:
        """Stops: channels closed (no hangup), the socket closed, tasks ended."""
        if self._stopped:
            return
        self._stopped = True
        for peer in self._peers.values():
            if peer.link is not None and peer.link.rtc is not None:
                with contextlib.suppress(Exception):
                    await peer.link.rtc.close("shutdown")
            for _, future in peer.waiting:
                if not future.done():
                    future.set_exception(ClientStopped())
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()
        self._outbox_ready.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _address(address: str) -> str:
        try:
            return parse_address(address)
        except InvalidAddress as error:
            raise ClientError(str(error)) from error

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._stopped:
            log.error("client: a task failed: %r", task.exception())

    def _emit(self, event: ClientEvent) -> None:
        self._outbox.append(event)
        if len(self._outbox) >= self.config.events_capacity:
            self._outbox_room.clear()
        self._outbox_ready.set()

    def _outbox_full(self) -> bool:
        return len(self._outbox) >= self.config.events_capacity

    def _peer(self, address: str) -> _PeerState:
        peer = self._peers.get(address)
        if peer is None:
            if len(self._peers) >= self.config.max_peers:
                raise Busy("max_peers reached")
            user_id = f"@{address.lower()}:{self._server_name}"
            peer = _PeerState(address, user_id, Peer(generate_stream_id(), self.config.limits))
            self._peers[address] = peer
        return peer

    def _push(self, peer: _PeerState, data: bytes) -> None:
        try:
            peer.reliable.push(self._clock.monotonic(), data)
        except (TooLarge, Full) as error:
            raise MessageTooLarge(str(error)) from error

    # ---------------------------------------------------------------- Matrix

    async def _sync_loop(self) -> None:
        timeout_ms = int(self.config.sync_timeout * 1000)
        try:
            async for events in self._matrix.sync_forever(timeout_ms):
                for event in events:
                    self._to_device(event)
                self._first_sync.set()
                self._wake.set()
                # Backpressure: no more reading while the application has a full outbox.
                while self._outbox_full() and not self._stopped:
                    self._outbox_room.clear()
                    await self._outbox_room.wait()
        except HomeserverError as error:
            self._emit(SyncStopped(str(error)))
            self._first_sync.set()

    def _to_device(self, event: ToDeviceEvent) -> None:
        if event.type in CALL_EVENTS:
            # A signal that came through Matrix (the peer's Switchboard found no socket of ours);
            # the same one may come over the socket too: repeats are ignored.
            call_id = event.content.get("call_id")
            if isinstance(call_id, str) and event.sender != self.user_id:
                signal = IncomingSignal(event.sender, None, None, call_id, event.type, event.content, "matrix")
                self._incoming_signal(signal)
            return
        if event.type not in (codec.EVENT_MESSAGE, codec.EVENT_ACK):
            return
        address = address_of_user(event.sender)
        if address is None or event.sender == self.user_id:
            return
        try:
            peer = self._peer(address)
        except Busy:
            log.warning("client.peers: max_peers reached; a message dropped")
            return
        now = self._clock.monotonic()
        try:
            if event.type == codec.EVENT_ACK:
                peer.reliable.receive_matrix_ack(now, event.content)
                return
            messages = peer.reliable.receive_matrix(now, event.content)
        except codec.NotText:
            messages = []
        except codec.ContentError as error:
            log.debug("client.matrix: a content dropped (%s)", error)
            messages = []
        for data in messages:
            self._emit(Message(peer.address, data))
        self._account_held(peer)
        self._keep_held_bytes_bounded()

    def _account_held(self, peer: _PeerState) -> None:
        """Brings ``peer``'s share of the bytes held for undelivered incoming messages up to date."""
        held = peer.reliable.retained_bytes()
        self._held_bytes += held - peer.held_bytes
        peer.held_bytes = held

    def _keep_held_bytes_bounded(self) -> None:
        """Past ``max_held_bytes`` across peers, the peers holding the most let go of what they
        hold undelivered (their senders send it again), largest first, until the total is within
        it."""
        # Bounded: each pass empties one peer's share.
        for _ in range(len(self._peers)):
            if self._held_bytes <= self.config.max_held_bytes:
                return
            peer = max(self._peers.values(), key=lambda p: p.held_bytes)
            log.warning(
                "client.memory: max_held_bytes reached; the peer's undelivered fragments are let go "
                "(peer %s, held %d, total %d)",
                peer.address,
                peer.held_bytes,
                self._held_bytes,
            )
            peer.reliable.shed_incoming()
            self._account_held(peer)

    def _send_matrix(self, peer: _PeerState, send: ToDevice) -> None:
        peer.matrix_busy = True

        async def run() -> None:
            now = self._clock.monotonic()
            try:
                await self._matrix.send_to_device(send.event_type, peer.user_id, send.content, send.txn_id)
            except (TimeoutError, MatrixError, aiohttp.ClientError) as error:
                log.warning("client.matrix: a send failed (%s); retrying later", type(error).__name__)
                peer.reliable.on_matrix_failed(self._clock.monotonic(), send)
                peer.matrix_backoff = self.config.matrix_backoff.next(peer.matrix_backoff)
                peer.matrix_retry_at = now + peer.matrix_backoff
            else:
                peer.matrix_backoff = None
                peer.matrix_retry_at = None
                if send.lines is not None:
                    peer.reliable.on_homeserver_accepted(*send.lines)
                    peer.matrix_batches += 1
                    peer.matrix_lines += send.lines[1]
                else:
                    peer.matrix_acks += 1
            finally:
                peer.matrix_busy = False
                self._wake.set()

        self._spawn(run())

    # ---------------------------------------------------------------- Switchboard

    async def _signal_loop(self) -> None:
        backoff: float | None = None
        while not self._stopped:
            try:
                if self._switchboard_url is None:
                    self._switchboard_url = await self._matrix.discover_switchboard()
                    if self._switchboard_url is None:
                        log.info("client.signal: the homeserver names no Switchboard; Matrix only")
                        return
                conn = await SignalConnection.connect(self._session, self._switchboard_url, self.config.access_token)
            except Unauthorized as error:
                log.error("client.signal: token refused (%s); Matrix only", error)
                return
            except (SignalError, MatrixError) as error:
                backoff = self.config.reconnect_backoff.next(backoff)
                log.info("client.signal: not connected (%s); retrying in %.0f s", error, backoff)
                await self._clock.sleep(backoff)
                continue
            backoff = None
            if conn.ready.device_id:
                self._device_id = conn.ready.device_id
            self._conn = conn
            self._emit(SwitchboardConnection(True))
            self._release_held()
            if self._watched:
                with contextlib.suppress(SignalError):
                    await conn.watch(sorted(self._watched))
            self._wake.set()
            await self._read_signals(conn)
            self._conn = None
            self._emit(SwitchboardConnection(False))
            if conn.close_code != 1012:
                backoff = self.config.reconnect_backoff.next(backoff)
                await self._clock.sleep(backoff)

    async def _read_signals(self, conn: SignalConnection) -> None:
        while True:
            item = await conn.events.get()
            if item is None:
                return
            if isinstance(item, IncomingSignal):
                self._incoming_signal(item)
            elif item.get("type") == "presence":
                users = item.get("users")
                self._emit(
                    Presence(
                        str(item.get("address")),
                        bool(item.get("reachable")),
                        users if isinstance(users, list) else [],
                    )
                )
            elif item.get("type") in ("glare", "call_ended"):
                call_id = item.get("call_id")
                for peer in self._peers.values():
                    if peer.link is not None and peer.link.call_id == call_id and not peer.link.open:
                        now = self._clock.monotonic()
                        self._drop_link(peer, now, f"the broker ended the call ({item.get('type')})", False)
                        self._schedule_retry(peer, now)
            self._wake.set()

    def _incoming_signal(self, signal: IncomingSignal) -> None:
        address = None
        if signal.from_address:
            with contextlib.suppress(InvalidAddress):
                address = parse_address(signal.from_address)
        address = address or address_of_user(signal.sender)
        if address is None:
            return
        if self._conn is None or self._conn.closed:
            self._hold(address, signal)
            return
        if signal.event_type == "m.call.invite":
            try:
                peer = self._peer(address)
            except Busy:
                return
            peer.user_id = signal.sender
            self._invite(peer, signal)
            return
        known = self._peers.get(address)
        link = known.link if known is not None else None
        if link is None or link.call_id != signal.call_id:
            return
        try:
            link.signals_in.put_nowait((signal.event_type, signal.content))
        except asyncio.QueueFull:
            log.warning("client.call: too many signals queued; one dropped")

    def _hold(self, address: str, signal: IncomingSignal) -> None:
        """Keeps a peer's invite (and its call's next signals) until Switchboard is connected."""
        now = self._clock.monotonic()
        if signal.event_type == "m.call.invite":
            try:
                peer = self._peer(address)
            except Busy:
                return
            peer.held = [(now, signal)]
            return
        known = self._peers.get(address)
        if (
            known is not None
            and known.held
            and known.held[0][1].call_id == signal.call_id
            and len(known.held) < EARLY_SIGNALS
        ):
            known.held.append((now, signal))

    def _release_held(self) -> None:
        """Switchboard is connected: held invites younger than HELD_SIGNALS_FOR are answered."""
        now = self._clock.monotonic()
        for peer in list(self._peers.values()):
            held, peer.held = peer.held, []
            if peer.link is None and peer.retry_at is not None:
                peer.retry_at = min(peer.retry_at, now)
            for at, signal in held:
                if now - at < HELD_SIGNALS_FOR:
                    self._incoming_signal(signal)

    # ---------------------------------------------------------------- calls

    def _invite(self, peer: _PeerState, signal: IncomingSignal) -> None:
        conn = self._conn
        if conn is None:
            return
        now = self._clock.monotonic()
        link = peer.link
        if link is not None:
            if link.call_id == signal.call_id:
                return
            if link.open and signal.via == "matrix":
                return  # maybe an old call brought by a first sync: it does not replace a channel
            if link.caller and not link.open and link.call_id < signal.call_id:
                return  # our call wins the glare rule
            self._drop_link(peer, now, "replaced by the peer's new call", hangup=False)
        new = _Link(call_id=signal.call_id, caller=False, started=now, progress=now)
        peer.link = new
        new.task = self._spawn(self._link_task(peer, new, conn, signal.content))

    def _call(self, peer: _PeerState, now: float) -> None:
        conn = self._conn
        if conn is None:
            return
        link = _Link(call_id=new_call_id(), caller=True, started=now, progress=now)
        peer.link = link
        peer.retry_at = None
        peer.calls += 1
        link.task = self._spawn(self._link_task(peer, link, conn, None))

    async def _link_task(
        self, peer: _PeerState, link: _Link, conn: SignalConnection, invite: dict[str, Any] | None
    ) -> None:
        """Makes the peer connection, sends the invite (or answer), then applies the peer's signals."""

        def callback(kind: str, value: Any) -> None:
            self._link_event(peer, link, kind, value)

        try:
            ice = conn.ice_servers
            rtc = PeerLink(ice, self.config.relay_only, link.call_id, self._device_id, link.caller, callback)
            link.rtc = rtc
            if invite is None:
                first_type, first = "m.call.invite", await rtc.offer()
            else:
                first_type, first = "m.call.answer", await rtc.answer(invite)
            if peer.link is not link:
                await rtc.close("replaced")
                return
            await conn.send_signal(peer.user_id, link.call_id, first_type, first)
            while not rtc.ended:
                event_type, content = await link.signals_in.get()
                select = await rtc.handle_signal(event_type, content)
                if select is not None:
                    with contextlib.suppress(SignalError):
                        await conn.send_signal(peer.user_id, link.call_id, "m.call.select_answer", select)
        except (RtcError, SignalError, ValueError) as error:
            log.info("client.call: the call failed (%s)", error)
            if peer.link is link:
                now = self._clock.monotonic()
                self._drop_link(peer, now, f"the call failed: {error}", hangup=False)
                self._schedule_retry(peer, now)
                self._wake.set()

    def _link_event(self, peer: _PeerState, link: _Link, kind: str, value: Any) -> None:
        if peer.link is not link:
            return
        now = self._clock.monotonic()
        if kind == "open":
            link.open = True
            link.path = str(value)
            peer.reliable.on_channel_open(now)
            conn = self._conn
            if conn is not None:

                async def connected() -> None:
                    with contextlib.suppress(SignalError):
                        await conn.connected(link.call_id)

                self._spawn(connected())
        elif kind == "message":
            if not link.open:
                return
            if self._outbox_full():
                # Not taken: the sender's resend timer brings it again (bounded memory).
                return
            try:
                messages = peer.reliable.receive_dc(now, value)
            except codec.FrameError as error:
                log.debug("client.channel: a frame dropped (%s)", error)
                messages = []
            for data in messages:
                self._emit(Message(peer.address, data))
            self._account_held(peer)
            self._keep_held_bytes_bounded()
        elif kind == "closed":
            self._drop_link(peer, now, str(value), hangup=False)
            self._schedule_retry(peer, now)
        self._wake.set()

    def _schedule_retry(self, peer: _PeerState, now: float) -> None:
        if not peer.wanted:
            return
        peer.backoff = self.config.upgrade_backoff.next(peer.backoff)
        peer.retry_at = now + peer.backoff

    def _drop_link(self, peer: _PeerState, now: float, reason: str, hangup: bool) -> None:
        link = peer.link
        if link is None:
            return
        peer.link = None
        rtc = link.rtc
        conn = self._conn
        if rtc is not None:

            async def end() -> None:
                if hangup and conn is not None:
                    with contextlib.suppress(SignalError):
                        await conn.send_signal(
                            peer.user_id, link.call_id, "m.call.hangup", rtc.hangup_content("user_hangup")
                        )
                await rtc.close(reason)

            self._spawn(end())
        if link.task is not None and not link.task.done():
            link.task.cancel()
        if link.open:
            peer.reliable.on_channel_lost()
        if link.announced is not None:
            if now - link.announced >= self.config.upgrade_backoff.maximum:
                peer.backoff = None
            self._emit(ChannelDown(peer.address, reason))

    # ---------------------------------------------------------------- the driver

    async def _run(self) -> None:
        while not self._stopped:
            now = self._clock.monotonic()
            deadline = now + 1.0
            for peer in list(self._peers.values()):
                peer.reliable.handle_timeout(now)
                self._pump(peer, now)
                for at in (
                    peer.reliable.poll_timeout(now),
                    peer.retry_at if peer.wanted else None,
                    peer.matrix_retry_at,
                    peer.link.started + CALL_TIMEOUT if peer.link and not peer.link.open else None,
                ):
                    if at is not None:
                        deadline = min(deadline, at)
            self._wake.clear()
            await self._clock.wait(self._wake, max(deadline - self._clock.monotonic(), 0.001))

    def _pump(self, peer: _PeerState, now: float) -> None:
        while peer.waiting and peer.reliable.has_room(len(peer.waiting[0][0])):
            data, future = peer.waiting.popleft()
            if future.done():
                continue
            try:
                self._push(peer, data)
                future.set_result(None)
            except MessageTooLarge as error:
                future.set_exception(error)
        link = peer.link
        if link is not None:
            state = peer.reliable.dc_state(now)
            stuck = link.open and link.rtc is not None and link.rtc.buffered_amount() > BUFFERED_HIGH
            if not stuck:
                link.progress = now
            if link.open and now >= link.progress + WRITE_STALL:
                # Its PINGs cannot get through either (a vanished relay leaves the buffer full).
                self._drop_link(peer, now, "the data channel stopped draining", hangup=True)
                self._schedule_retry(peer, now)
            elif link.open and state is DcState.DEAD:
                self._drop_link(peer, now, "the data channel went silent", hangup=True)
                self._schedule_retry(peer, now)
            elif not link.open and now >= link.started + CALL_TIMEOUT:
                self._drop_link(peer, now, "the call did not connect in time", hangup=True)
                self._schedule_retry(peer, now)
        state = peer.reliable.dc_state(now)
        link = peer.link
        if link is not None and link.open and link.rtc is not None:
            if link.announced is None and state is DcState.ALIVE:
                link.announced = now
                peer.channels_up += 1
                self._emit(ChannelUp(peer.address, link.path or "direct"))
            if state is not DcState.STALLED and link.rtc.buffered_amount() <= BUFFERED_HIGH:
                frames = peer.reliable.poll_dc(now, DC_POLL_BYTES)
                peer.dc_data_frames += sum(1 for f in frames if f[0] == codec.DATA)
                for message in _join(frames):
                    if not link.rtc.send(message):
                        break
        due = peer.matrix_retry_at is None or now >= peer.matrix_retry_at
        if not peer.matrix_busy and due and (state is not DcState.ALIVE or not peer.reliable.outgoing.has_pending()):
            send = peer.reliable.poll_matrix(now)
            if send is not None:
                self._send_matrix(peer, send)
        if (
            peer.wanted
            and peer.link is None
            and (peer.retry_at is None or now >= peer.retry_at)
            and self._conn is not None
            and not self._conn.closed
        ):
            self._call(peer, now)


def _join(frames: list[bytes]) -> list[bytes]:
    """Small frames that wait together go as one BATCH message of at most 16 KiB, as the Rust
    client's writer joins them; a frame alone goes as it is."""
    messages: list[bytes] = []
    group: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        if len(group) == 1:
            messages.append(group[0])
        elif group:
            messages.append(codec.join_frames(group))
        group, size = [], 0

    for frame in frames:
        if len(frame) > SMALL_FRAME:
            flush()
            messages.append(frame)
            continue
        if group and codec.batch_size(size + len(frame), len(group) + 1) > codec.BATCH_LIMIT:
            flush()
        group.append(frame)
        size += len(frame)
    flush()
    return messages
