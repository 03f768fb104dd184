"""One call (Matrix VoIP v1) carrying one data channel labelled ``switchboard``, negotiated in-band,
unordered and reliable, as the Rust client's ``rtc.rs``. aiortc does not trickle: every local
candidate is in the offer or answer SDP. Remote candidates (the Rust client and browsers trickle
them) are added as they come, the empty end-of-candidates candidate included.

An explicit ICE server list is always given (never aiortc's default public STUN server); only
``turn:``/``stun:`` URIs over UDP are used."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
from collections.abc import Callable
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.sdp import candidate_from_sdp

from .signal import IceServers

log = logging.getLogger("switchboard_client.rtc")

CHANNEL_LABEL = "switchboard"
VERSION = "1"
RAIDEN_PARTY = "raiden"
MAX_EARLY_CANDIDATES = 256
# Messages kept while the caller's channel waits for the DATA_CHANNEL_ACK (see PeerLink._adopt).
MAX_EARLY_MESSAGES = 64
INVITE_LIFETIME_MS = 60_000

# (kind, value): ("open", path) | ("message", bytes) | ("closed", reason)
LinkCallback = Callable[[str, Any], None]


class RtcError(Exception):
    """A signal could not be used, or the peer connection could not be made."""


def new_call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(24))


def usable_ice_servers(ice: IceServers | None) -> list[RTCIceServer]:
    if ice is None:
        return []
    urls = [
        uri
        for uri in ice.uris
        if (uri.startswith(("turn:", "stun:"))) and ("transport=" not in uri or "transport=udp" in uri)
    ]
    if not urls:
        return []
    return [RTCIceServer(urls=urls, username=ice.username, credential=ice.password)]


def _party(content: dict[str, Any]) -> str | None:
    party = content.get("party_id")
    return party if isinstance(party, str) else None


class PeerLink:
    """A peer connection and its data channel. Events go to ``callback`` (called in the loop)."""

    def __init__(
        self,
        ice: IceServers | None,
        relay_only: bool,
        call_id: str,
        party_id: str,
        caller: bool,
        callback: LinkCallback,
    ) -> None:
        servers = usable_ice_servers(ice)
        if relay_only and not any(u.startswith("turn:") for s in servers for u in s.urls):
            raise RtcError("relay-only ICE without a TURN server")
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))
        self.relay_only = relay_only
        self.call_id = call_id
        self.party_id = party_id
        self.caller = caller
        self.channel: RTCDataChannel | None = None
        self.peer_party: str | None = None
        self._callback = callback
        self._described = False
        self._early: list[dict[str, Any]] = []
        self._ended = False
        self._opened = False
        self._early_messages: list[bytes] = []

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            state = self.pc.connectionState
            if state in ("failed", "closed"):
                self._end(f"the peer connection {state}")

        @self.pc.on("datachannel")
        def _datachannel(channel: RTCDataChannel) -> None:
            if channel.label != CHANNEL_LABEL or self.channel is not None:
                return
            self._adopt(channel)
            if channel.readyState == "open":
                self._on_open()

    def _adopt(self, channel: RTCDataChannel) -> None:
        self.channel = channel

        @channel.on("open")
        def _open() -> None:
            self._on_open()

        @channel.on("message")
        def _message(message: bytes | str) -> None:
            if not isinstance(message, bytes) or self._ended:
                return
            if not self._opened:
                # The channel is unordered, so the peer's first messages can come before the
                # DATA_CHANNEL_ACK that opens our end (the Rust client's webrtc-rs sends queued
                # unordered chunks ahead of the ordered ACK). They wait for the open: dropped, the
                # peer's HELLO would never come again, and the channel would sit in its handshake
                # until given up as dead. Past the bound, the sender's resend timer brings DATA again.
                if len(self._early_messages) < MAX_EARLY_MESSAGES:
                    self._early_messages.append(message)
                return
            self._callback("message", message)

        @channel.on("close")
        def _close() -> None:
            self._end("the data channel closed")

    def _on_open(self) -> None:
        if self._opened or self._ended:
            return
        self._opened = True
        self._callback("open", self.path())
        early, self._early_messages = self._early_messages, []
        for message in early:
            if self._ended:
                return
            self._callback("message", message)

    def _end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._callback("closed", reason)

    @property
    def ended(self) -> bool:
        return self._ended

    def path(self) -> str:
        """``relay`` when the selected pair goes through TURN, else ``direct``."""
        try:
            connection = self.pc.sctp.transport.transport._connection  # type: ignore[union-attr]
            pair = next(iter(connection._nominated.values()))
            types = (pair.protocol.local_candidate.type, pair.remote_candidate.type)
            return "relay" if "relay" in types else "direct"
        except (AttributeError, StopIteration):
            return "relay" if self.relay_only else "direct"

    def _content(self, **fields: Any) -> dict[str, Any]:
        return {"call_id": self.call_id, "party_id": self.party_id, "version": VERSION, **fields}

    async def offer(self) -> dict[str, Any]:
        """Caller: the ``m.call.invite`` content (the SDP holds every candidate)."""
        self._adopt(self.pc.createDataChannel(CHANNEL_LABEL, ordered=False))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        return self._content(lifetime=INVITE_LIFETIME_MS, offer={"type": "offer", "sdp": sdp})

    async def answer(self, invite: dict[str, Any]) -> dict[str, Any]:
        """Callee: applies the invite and gives the ``m.call.answer`` content."""
        offer = invite.get("offer")
        sdp = offer.get("sdp") if isinstance(offer, dict) else None
        if not isinstance(sdp, str):
            raise RtcError("an invite without offer.sdp")
        self.peer_party = _party(invite) or "legacy"
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        self._described = True
        await self._add_early()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self._content(answer={"type": "answer", "sdp": self.pc.localDescription.sdp})

    async def _add_early(self) -> None:
        early, self._early = self._early, []
        for candidate in early:
            await self._add_candidate(candidate)

    async def handle_signal(self, event_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
        """Applies a signal of this call; returns a ``m.call.select_answer`` content to send when an
        answer was taken (caller, peer not a Raiden node)."""
        party = _party(content)
        if event_type == "m.call.answer" and self.caller:
            if self._described:
                return None
            answer = content.get("answer")
            sdp = answer.get("sdp") if isinstance(answer, dict) else None
            if not isinstance(sdp, str):
                raise RtcError("an answer without answer.sdp")
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            self._described = True
            self.peer_party = party or "legacy"
            await self._add_early()
            if self.peer_party != RAIDEN_PARTY:
                return self._content(selected_party_id=self.peer_party)
        elif event_type == "m.call.candidates":
            if self.peer_party is not None and party is not None and party != self.peer_party:
                return None
            candidates = content.get("candidates")
            if not isinstance(candidates, list):
                raise RtcError("candidates without a list")
            for candidate in candidates:
                if not isinstance(candidate, dict):
                    continue
                if self._described:
                    await self._add_candidate(candidate)
                elif len(self._early) < MAX_EARLY_CANDIDATES:
                    self._early.append(candidate)
        elif event_type == "m.call.select_answer" and not self.caller:
            selected = content.get("selected_party_id")
            if isinstance(selected, str) and selected != self.party_id:
                await self.close("another device's answer was selected")
        elif event_type in ("m.call.hangup", "m.call.reject"):
            await self.close(f"the peer's {event_type.removeprefix('m.call.')}")
        return None

    async def _add_candidate(self, raw: dict[str, Any]) -> None:
        text = raw.get("candidate")
        if not isinstance(text, str):
            return
        if not text:
            with contextlib.suppress(Exception):
                await self.pc.addIceCandidate(None)  # end of candidates
            return
        try:
            candidate = candidate_from_sdp(text.removeprefix("candidate:"))
            mid = raw.get("sdpMid")
            index = raw.get("sdpMLineIndex")
            candidate.sdpMid = mid if isinstance(mid, str) else "0"
            candidate.sdpMLineIndex = index if isinstance(index, int) and not isinstance(index, bool) else 0
            await self.pc.addIceCandidate(candidate)
        except Exception as error:  # noqa: BLE001 - a malformed remote candidate is skipped
            log.debug("rtc.candidate: skipped (%s)", type(error).__name__)

    def hangup_content(self, reason: str) -> dict[str, Any]:
        return self._content(reason=reason)

    def buffered_amount(self) -> int:
        return self.channel.bufferedAmount if self.channel is not None else 0

    def send(self, message: bytes) -> bool:
        """Writes one message; False when the channel is not open."""
        channel = self.channel
        if channel is None or channel.readyState != "open" or self._ended:
            return False
        try:
            channel.send(message)
        except Exception:  # noqa: BLE001 - aiortc raises InvalidStateError and others on a closing channel
            return False
        return True

    async def close(self, reason: str = "closed") -> None:
        self._end(reason)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pc.close(), 5.0)
