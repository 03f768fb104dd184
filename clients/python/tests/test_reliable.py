"""The delivery layer over a simulated network in stepped time (mirrors the Rust client's
``src/client/reliable/tests.rs``)."""

from __future__ import annotations

import asyncio
import random
from collections import deque

import pytest

from switchboard_client import codec
from switchboard_client.client import Client, ClientConfig, ConfigError, Message
from switchboard_client.identity import address_of_user
from switchboard_client.matrix import ToDeviceEvent
from switchboard_client.reliable import HELD_OVERHEAD, DcState, Full, Limits, Peer, ToDevice, TooLarge


class Sim:
    def __init__(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self.now = 1000.0
        self.peers = {"a": Peer(0xA1, limits), "b": Peer(0xB1, limits)}
        self.dc: dict[str, deque[bytes]] = {"a": deque(), "b": deque()}
        self.mx: dict[str, deque[ToDevice]] = {"a": deque(), "b": deque()}
        self.got: dict[str, list[bytes]] = {"a": [], "b": []}

    @staticmethod
    def other(side: str) -> str:
        return "b" if side == "a" else "a"

    def step(self, by: float) -> None:
        self.now += by
        for peer in self.peers.values():
            peer.handle_timeout(self.now)

    def open(self) -> None:
        for peer in self.peers.values():
            peer.on_channel_open(self.now)

    def kill(self) -> None:
        for side, peer in self.peers.items():
            self.dc[side].clear()
            peer.on_channel_lost()

    def poll_dc(self, side: str) -> None:
        self.dc[self.other(side)].extend(self.peers[side].poll_dc(self.now, 1 << 30))

    def deliver_dc(self, to: str, index: int = 0, dup: bool = False) -> None:
        queue = self.dc[to]
        if not queue:
            return
        i = index % len(queue)
        frame = queue[i]
        if not dup:
            del queue[i]
        self.got[to].extend(self.peers[to].receive_dc(self.now, frame))

    def poll_matrix(self, side: str, accepted: bool = True) -> bool:
        peer = self.peers[side]
        send = peer.poll_matrix(self.now)
        if send is None:
            return False
        if not accepted:
            peer.on_matrix_failed(self.now, send)
            return True
        if send.lines is not None:
            peer.on_homeserver_accepted(*send.lines)
        self.mx[self.other(side)].append(send)
        return True

    def deliver_matrix(self, to: str, dup: bool = False) -> None:
        queue = self.mx[to]
        if not queue:
            return
        send = queue[0] if dup else queue.popleft()
        peer = self.peers[to]
        if send.event_type == codec.EVENT_ACK:
            peer.receive_matrix_ack(self.now, send.content)
        else:
            self.got[to].extend(peer.receive_matrix(self.now, send.content))

    def settle(self) -> None:
        for _ in range(10_000):
            busy = False
            for side in ("a", "b"):
                state = self.peers[side].dc_state(self.now)
                if state is not DcState.CLOSED:
                    before = len(self.dc["a"]) + len(self.dc["b"])
                    self.poll_dc(side)
                    busy |= len(self.dc["a"]) + len(self.dc["b"]) > before
                if state is not DcState.ALIVE:
                    while self.poll_matrix(side):
                        busy = True
            while self.dc["a"] or self.dc["b"]:
                busy = True
                self.deliver_dc("a")
                self.deliver_dc("b")
            while self.mx["a"] or self.mx["b"]:
                busy = True
                self.deliver_matrix("a")
                self.deliver_matrix("b")
            if not busy:
                if not self.peers["a"].outgoing.buffer and not self.peers["b"].outgoing.buffer:
                    return
                times = [t for p in self.peers.values() if (t := p.poll_timeout(self.now)) is not None]
                nxt = min(times, default=self.now + 1)
                self.step(max(nxt - self.now, 0.001))
        raise AssertionError("did not settle")

    def handshake(self) -> None:
        self.open()
        for _ in range(4):
            self.poll_dc("a")
            self.poll_dc("b")
            while self.dc["a"] or self.dc["b"]:
                self.deliver_dc("a")
                self.deliver_dc("b")
        assert self.peers["a"].dc_state(self.now) is DcState.ALIVE
        assert self.peers["b"].dc_state(self.now) is DcState.ALIVE


def msg(i: int) -> bytes:
    return f'{{"type":"Processed","message_identifier":"{i}"}}'.encode()


def test_delivery_in_order_once_when_channel_dies_after_a_prefix() -> None:
    sim = Sim()
    sim.handshake()
    sent = [msg(i) for i in range(100)]
    for m in sent:
        sim.peers["a"].push(sim.now, m)
    sim.poll_dc("a")
    for _ in range(40):
        sim.deliver_dc("b")
    assert sim.got["b"] == sent[:40]
    sim.kill()  # the rest in flight is lost with the channel
    sim.settle()
    assert sim.got["b"] == sent
    assert sim.peers["a"].outgoing.counters.fragments_resent > 0


def test_duplicates_on_both_transports_are_dropped() -> None:
    sim = Sim()
    sent = [msg(i) for i in range(5)]
    for m in sent:
        sim.peers["a"].push(sim.now, m)
    while sim.poll_matrix("a"):
        pass
    sim.deliver_matrix("b", dup=True)
    sim.deliver_matrix("b")
    sim.handshake()
    for m in sent:  # sent again on the channel after the HELLO
        sim.peers["b"].receive_matrix(sim.now, {"msgtype": "m.text", "body": "x"})  # plain line: delivered
    sim.got["b"] = [m for m in sim.got["b"] if m != b"x"]
    sim.settle()
    assert sim.got["b"] == sent
    assert sim.peers["b"].incoming.counters.duplicates_dropped >= 5


def test_large_and_binary_messages_are_reassembled_over_both_transports() -> None:
    sim = Sim()
    big_text = ("é" * 20_000).encode()  # 40,000 bytes, cut at character boundaries
    binary = bytes(range(256)) * 200
    sim.peers["a"].push(sim.now, big_text)
    sim.peers["a"].push(sim.now, binary)
    send = sim.peers["a"].poll_matrix(sim.now)
    assert send is not None
    body = send.content["body"]
    assert "b64" not in send.content[codec.STREAM_FIELD] or 0 not in send.content[codec.STREAM_FIELD]["b64"]
    assert all(len(line) <= 21_848 for line in body.split("\n"))
    sim.mx["b"].append(send)
    sim.peers["a"].on_homeserver_accepted(*send.lines)  # type: ignore[misc]
    sim.settle()
    assert sim.got["b"] == [big_text, binary]
    sim.handshake()
    sim.peers["b"].push(sim.now, binary)
    sim.peers["b"].push(sim.now, big_text)
    sim.settle()
    assert sim.got["a"] == [binary, big_text]


def test_push_is_refused_while_the_buffer_is_full_and_taken_after_an_ack() -> None:
    sim = Sim(Limits(replay_buffer_bytes=100))
    a = sim.peers["a"]
    with pytest.raises(TooLarge):
        a.push(sim.now, bytes(101))
    a.on_channel_open(sim.now)  # not needed, but any state works
    a.on_channel_lost()
    sim.peers["b"].receive_matrix(sim.now, {"msgtype": "m.text", "body": "x"})
    a.outgoing.on_peer_speaks()
    a.push(sim.now, bytes(60))
    assert not a.has_room(60)
    with pytest.raises(Full):
        a.push(sim.now, bytes(60))
    sim.settle()
    assert a.has_room(60)
    a.push(sim.now, bytes(60))


def test_plain_raiden_peer_reads_our_messages_and_releases_what_the_homeserver_took() -> None:
    peer = Peer(0xA1, Limits(replay_buffer_bytes=100))
    for i in range(10):  # 10 x 60 bytes through a 100-byte buffer: no ack ever comes
        peer.push(0.0, bytes([0x41]) * 60)
        send = peer.poll_matrix(0.0)
        assert send is not None and send.lines is not None
        assert send.content["body"] == "A" * 60
        peer.on_homeserver_accepted(*send.lines)
    assert peer.outgoing.counters.released_unacked == 9
    assert peer.receive_matrix(0.0, {"msgtype": "m.text", "body": "one\ntwo"}) == [b"one", b"two"]


def test_receiver_without_state_starts_at_base_and_txn_ids_are_documented() -> None:
    peer = Peer(0xB1)
    content = {
        "msgtype": "m.text",
        "body": "m5\nm6",
        codec.STREAM_FIELD: {"id": "00000000000000a1", "seq": 5, "base": 5},
    }
    assert peer.receive_matrix(0.0, content) == [b"m5", b"m6"]
    send = peer.poll_matrix(2.0)
    assert send is not None
    assert (send.event_type, send.txn_id, send.content) == (
        codec.EVENT_ACK,
        "sb-ack.00000000000000a1.6",
        {"id": "00000000000000a1", "seq": 6},
    )
    peer.push(0.0, b"hi")
    send = peer.poll_matrix(0.0)
    assert send is not None and send.txn_id == "sb.00000000000000b1.1.1"


def test_unanswered_ping_stalls_then_kills_the_channel() -> None:
    sim = Sim()
    sim.handshake()
    a = sim.peers["a"]
    sim.step(5.0)
    sim.poll_dc("a")  # a PING that never gets an answer
    sim.dc["b"].clear()
    sim.step(2.0)
    assert a.dc_state(sim.now) is DcState.STALLED
    sim.step(13.0)
    assert a.dc_state(sim.now) is DcState.DEAD


def test_frames_joined_in_a_batch_arrive_as_if_sent_one_by_one() -> None:
    sim = Sim()
    sim.handshake()
    sent = [msg(i) for i in range(20)]
    for m in sent:
        sim.peers["a"].push(sim.now, m)
    frames = sim.peers["a"].poll_dc(sim.now, 1 << 20)
    joined = codec.join_frames(frames + [b"\x7f"])  # an unknown type inside is skipped
    sim.got["b"].extend(sim.peers["b"].receive_dc(sim.now, joined))
    assert sim.got["b"] == sent


@pytest.mark.parametrize("seed", range(200))
def test_every_message_arrives_once_in_order_over_random_interleavings(seed: int) -> None:
    rng = random.Random(seed)
    small = rng.random() < 0.5
    limits = (
        Limits(reorder_buffer_bytes=40 * 1024, replay_buffer_bytes=128 * 1024, batch_lines=3) if small else Limits()
    )
    sim = Sim(limits)
    sent: dict[str, list[bytes]] = {"a": [], "b": []}
    is_open = False
    for _ in range(rng.randrange(1, 200)):
        op = rng.randrange(9)
        side = rng.choice("ab")
        if op == 0:
            n = len(sent[side])
            kind = rng.randrange(3)
            m = f"{side}{n}".encode() if kind == 0 else bytes([n % 256]) * 20_000 if kind == 1 else b""
            try:
                sim.peers[side].push(sim.now, m)
                sent[side].append(m)
            except Full:
                pass
        elif op == 1:
            a_knows = sim.peers["a"].incoming.delivered(0xB1) is not None
            b_knows = sim.peers["b"].incoming.delivered(0xA1) is not None
            if not is_open and (a_knows or not sim.mx["a"]) and (b_knows or not sim.mx["b"]):
                sim.open()
                is_open = True
        elif op == 2:
            sim.kill()
            is_open = False
        elif op == 3 and is_open:
            sim.poll_dc(side)
        elif op == 4:
            sim.deliver_dc(side, rng.randrange(100), rng.random() < 0.2)
        elif op == 5:
            sim.poll_matrix(side, rng.random() < 0.8)
        elif op == 6:
            sim.deliver_matrix(side, rng.random() < 0.2)
        elif op == 7:
            sim.step(rng.choice([0.001, 0.02, 1.0, 3.0, 11.0]))
        assert sent["b"][: len(sim.got["a"])] == sim.got["a"]
        assert sent["a"][: len(sim.got["b"])] == sim.got["b"]
    sim.settle()
    assert sim.got["b"] == sent["a"]
    assert sim.got["a"] == sent["b"]


def test_shedding_what_is_held_undelivered_loses_nothing_the_sender_still_holds() -> None:
    sim = Sim()
    sim.handshake()
    # A large message (7 fragments) between two small ones.
    sent = [msg(0), bytes(range(256)) * 400, msg(2)]
    for m in sent:
        sim.peers["a"].push(sim.now, m)
    sim.poll_dc("a")
    # B takes the first message, half of the large one, and the last one out of order.
    last = sim.dc["b"].pop()
    for _ in range(4):
        sim.deliver_dc("b")
    sim.dc["b"].appendleft(last)
    sim.deliver_dc("b")
    b = sim.peers["b"]
    assert sim.got["b"] == sent[:1]
    assert b.retained_bytes() > 3 * codec.FRAGMENT_SIZE, b.retained_bytes()

    b.shed_incoming()
    assert (b.retained_bytes(), b.incoming.counters.sheds) == (0, 1)
    # What is still in flight arrives, then the sender's resend timer brings the rest: every
    # message once, in order, the large one intact.
    sim.settle()
    assert sim.got["b"] == sent
    assert sim.peers["a"].outgoing.counters.resend_timeouts >= 1


def test_retained_bytes_count_out_of_order_fragments_early_data_and_partial_messages() -> None:
    incoming = Peer(0xB1).incoming
    assert incoming.retained_bytes() == 0
    # DATA before the HELLO: payload plus the per-fragment overhead.
    assert incoming.receive_dc_data(0.0, 3, codec.Line(False, b"c" * 100)) == []
    assert incoming.retained_bytes() == 100 + HELD_OVERHEAD
    # Out of order on a stream: held likewise; the head of a message: its bytes.
    out = incoming.receive_batch(0.0, codec.Batch(0xA1, 3, 1, [codec.Line(False, b"z" * 50)]))
    assert out == []
    assert incoming.retained_bytes() == 100 + 50 + 2 * HELD_OVERHEAD
    assert incoming.receive_batch(0.0, codec.Batch(0xA1, 1, 1, [codec.Line(True, b"x" * 1000)])) == []
    assert incoming.retained_bytes() == 100 + 50 + 1000 + 2 * HELD_OVERHEAD
    # The gap filled: both messages delivered, only the early DATA is left.
    out = incoming.receive_batch(0.0, codec.Batch(0xA1, 2, 1, [codec.Line(False, b"y")]))
    assert out == [b"x" * 1000 + b"y", b"z" * 50]
    assert incoming.retained_bytes() == 100 + HELD_OVERHEAD
    incoming.on_channel_lost()
    assert incoming.retained_bytes() == 0
    # A shed stream starts again after its last delivered message; what it sent again is taken.
    incoming.receive_batch(0.0, codec.Batch(0xA1, 4, 1, [codec.Line(True, b"p" * 10)]))
    incoming.receive_batch(0.0, codec.Batch(0xA1, 6, 1, [codec.Line(False, b"r")]))
    assert incoming.retained_bytes() == 10 + 1 + HELD_OVERHEAD
    incoming.shed()
    assert (incoming.retained_bytes(), incoming.counters.sheds) == (0, 1)
    again = [codec.Line(True, b"p" * 10), codec.Line(False, b"q")]
    out = incoming.receive_batch(0.0, codec.Batch(0xA1, 4, 1, again))
    assert out == [b"p" * 10 + b"q"]
    assert incoming.counters.duplicates_dropped == 0


def test_client_over_max_held_bytes_sheds_the_peer_holding_the_most() -> None:
    # No network: the client's Matrix handling is fed directly.
    limits = Limits(max_message_bytes=128 * 1024, reorder_buffer_bytes=4 * 1024)
    config = ClientConfig("http://127.0.0.1:9", "token", limits=limits, max_held_bytes=132 * 1024)
    client = Client(config, None, None)  # type: ignore[arg-type]
    client._server_name = "example.org"
    senders = {f"@0x{c * 40}:example.org": Peer(int(c, 16), limits) for c in ("1", "2")}
    sends: dict[str, list[ToDevice]] = {}
    big = {user: bytes([i]) * n for i, (user, n) in enumerate(zip(senders, (100 * 1024, 80 * 1024)))}
    for user, sender in senders.items():
        sender.outgoing.on_peer_speaks()
        sender.push(0.0, big[user])
        sends[user] = []
        while (send := sender.poll_matrix(0.0)) is not None:
            sender.on_homeserver_accepted(*send.lines)  # type: ignore[misc]
            sends[user].append(send)
    first, second = senders
    # All but the last batch of each: both messages partly reassembled (96 KiB and 64 KiB).
    for send in sends[first][:-1]:
        client._to_device(ToDeviceEvent(first, send.event_type, send.content))
    peers = {first: client._peers[address_of_user(first)]}  # type: ignore[index]
    assert client._held_bytes == peers[first].held_bytes == 96 * 1024
    for send in sends[second][:-1]:
        client._to_device(ToDeviceEvent(second, send.event_type, send.content))
    peers[second] = client._peers[address_of_user(second)]  # type: ignore[index]
    # The peer holding the most (the first) let go when the second took the total over the budget.
    assert peers[first].reliable.incoming.counters.sheds == 1
    assert peers[second].reliable.incoming.counters.sheds == 0
    assert client._held_bytes == sum(p.held_bytes for p in peers.values()) <= config.max_held_bytes
    assert (peers[first].held_bytes, peers[second].held_bytes) == (0, 64 * 1024)
    # The sender's resend brings the first message whole; the second completes as it was.
    for user in (first, second):
        client._to_device(ToDeviceEvent(user, sends[user][-1].event_type, sends[user][-1].content))
    sender = senders[first]
    deadline = sender.poll_timeout(0.0)
    assert deadline is not None
    sender.handle_timeout(deadline)
    assert sender.outgoing.counters.resend_timeouts == 1
    while (send := sender.poll_matrix(deadline)) is not None:
        client._to_device(ToDeviceEvent(first, send.event_type, send.content))
    got = [(e.address, e.data) for e in client._outbox if isinstance(e, Message)]
    assert got == [(address_of_user(second), big[second]), (address_of_user(first), big[first])]
    assert client._held_bytes == 0


def test_connect_refuses_a_memory_budget_below_one_peers_bounds_before_any_request() -> None:
    # Nothing listens on port 9 of loopback: the check comes before the homeserver is asked.
    config = ClientConfig("http://127.0.0.1:9", "token")
    config.max_held_bytes = config.limits.max_message_bytes
    with pytest.raises(ConfigError, match="max_held_bytes"):
        asyncio.run(Client.connect(config))
