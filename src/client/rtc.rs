//! One WebRTC peer connection and data channel per peer, on `webrtc` 0.17.2.
//!
//! A [`PeerLink`] is one call (Matrix VoIP v1) that carries one data channel, labelled
//! [`CHANNEL_LABEL`] and negotiated in-band. The caller creates it with [`PeerLink::call`], which
//! also gives the `m.call.invite` content; the callee with [`PeerLink::answer`], from the invite,
//! which gives the `m.call.answer` content (both carry the candidates gathered by our first one
//! in their SDP). Everything else a side must send (its trickled
//! `m.call.candidates` in small batches, ending with the empty end-of-candidates candidate; the
//! caller's `m.call.select_answer`) comes out of [`LinkEvents`] as [`LinkEvent::Signal`], and
//! what the peer sends goes in through [`PeerLink::handle_signal`] (candidates that arrive before
//! the remote description are kept until it is set). [`LinkEvent::Open`] says the channel is open
//! and whether it goes through a TURN relay; then [`LinkEvent::Message`]s, and in the end exactly
//! one [`LinkEvent::Closed`] or [`LinkEvent::Failed`].
//!
//! This module has no policy: the integrator decides when to call, answer, hang up or retry, and
//! how signals travel (Switchboard's WebSocket, or Matrix). ICE: the servers of `ready`, relay
//! acceptance without the default 2 s wait, and optionally relay candidates only. Only `turn:`/
//! `stun:` over UDP is used: `webrtc` 0.17 gathers no relay candidates over TCP or TLS.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::{Mutex, Notify, mpsc, watch};
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::data_channel::data_channel_state::RTCDataChannelState;
use webrtc::ice_transport::ice_candidate::{RTCIceCandidate, RTCIceCandidateInit};
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

use super::signal::IceServers;
use crate::clock::Clock;
use crate::signalling::EventType;

/// The data channel's label.
pub const CHANNEL_LABEL: &str = "switchboard";

/// The largest message [`PeerLink::send`] takes: what `webrtc` 0.17 reads in one message
/// (browsers are only safe up to 16 KiB; the delivery layer fragments at that size).
pub const MAX_MESSAGE_BYTES: usize = 65_535;

/// The Matrix VoIP version spoken.
const VERSION: &str = "1";

/// Remote candidates kept while the remote description is not set, at most (more are dropped).
const MAX_EARLY_CANDIDATES: usize = 256;

/// Local candidates waiting to be batched, at most (a handful per ICE server in practice).
const CANDIDATE_QUEUE: usize = 256;

/// The `party_id` Switchboard gives signals from Raiden 3.x nodes, which know no `select_answer`.
const RAIDEN_PARTY: &str = "raiden";

/// The data channel's reliability. The default is what Switchboard's clients use: unordered and
/// reliable (no retransmit or lifetime limit); the delivery layer orders messages itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelOptions {
    pub ordered: bool,
    /// Partial reliability: give up on a message after this many retransmissions.
    pub max_retransmits: Option<u16>,
    /// Partial reliability: give up on a message after this many milliseconds.
    pub max_packet_life_time: Option<u16>,
}

/// How a [`PeerLink`] is set up, each field with a documented default.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// TURN (and STUN) servers, as `ready` or an `ice_servers` frame gives them. Default none.
    pub ice_servers: Option<IceServers>,
    /// Gather relay candidates only (`RTCIceTransportPolicy::Relay`): every byte goes through
    /// TURN and no local address is revealed to the peer. Default false.
    pub relay_only: bool,
    pub channel: ChannelOptions,
    /// The invite's `lifetime`. Default 60 s.
    pub invite_lifetime: Duration,
    /// Candidates per `m.call.candidates` signal, at most. Default 8.
    pub candidates_per_signal: usize,
    /// [`PeerLink::send`] waits while the channel buffers more than this many bytes. Default 1 MiB.
    pub buffered_high: usize,
    /// …and goes on once the buffer has drained to this many. Default 256 KiB.
    pub buffered_low: usize,
    /// How long [`PeerLink::send`] waits for the buffer to drain before giving up
    /// ([`RtcError::Stalled`]). Default 30 s.
    pub stall_timeout: Duration,
    /// Events the application may leave unread before the link waits for it (incoming messages
    /// then stay in the transport, whose flow control slows the peer down). Default 256.
    pub events_capacity: usize,
    /// Also gather loopback host candidates (tests on one machine without TURN). Default false.
    pub include_loopback: bool,
    /// How long an invite or an answer waits for our first local candidate, to carry it in its
    /// SDP rather than trickle it after (a host candidate comes at once, a relay one after the
    /// TURN allocation). Past this, it goes without and every candidate trickles. Default 250 ms.
    pub first_candidate_wait: Duration,
    /// Where time comes from (the send stall timeout, the first candidate's wait, closing).
    pub clock: Clock,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: None,
            relay_only: false,
            channel: ChannelOptions::default(),
            invite_lifetime: Duration::from_secs(60),
            candidates_per_signal: 8,
            buffered_high: 1024 * 1024,
            buffered_low: 256 * 1024,
            stall_timeout: Duration::from_secs(30),
            events_capacity: 256,
            include_loopback: false,
            first_candidate_wait: Duration::from_millis(250),
            clock: Clock::system(),
        }
    }
}

/// How the open channel travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Either side of the selected candidate pair is a TURN relay candidate.
    Relay,
    /// Host or server-reflexive candidates on both sides.
    Direct,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Relay => "relay",
            Path::Direct => "direct",
        }
    }
}

/// A signal for the peer: hand it to [`super::signal::SignalConnection::send_signal`] (or send
/// it through Matrix).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingSignal {
    pub call_id: String,
    pub event_type: EventType,
    /// Matrix VoIP v1 content (with `call_id`, `party_id` and `version`).
    pub content: Map<String, Value>,
}

/// What a link tells its owner, in order.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A signal to send to the peer (candidates, `select_answer`), after the invite or answer.
    Signal(OutgoingSignal),
    /// The data channel is open.
    Open { path: Path },
    /// A message from the peer (text messages are handed over as their bytes).
    Message(Bytes),
    /// The channel or the connection closed (a hangup, either side closing). Last event.
    Closed,
    /// ICE or DTLS failed, or the channel broke. Last event.
    Failed(String),
}

/// The events of a link; ends after [`LinkEvent::Closed`] or [`LinkEvent::Failed`].
#[derive(Debug)]
pub struct LinkEvents {
    events: mpsc::Receiver<LinkEvent>,
}

impl LinkEvents {
    pub async fn next(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }
}

impl futures_util::Stream for LinkEvents {
    type Item = LinkEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<LinkEvent>> {
        self.events.poll_recv(cx)
    }
}

/// An `m.call.invite`, read from its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub call_id: String,
    pub party_id: String,
    /// Milliseconds the invite is valid for.
    pub lifetime: Option<u64>,
    pub sdp: String,
}

impl Invite {
    /// Reads an invite's content (as a [`super::signal::IncomingSignal`] carries it).
    pub fn parse(call_id: &str, content: &Map<String, Value>) -> Result<Self, RtcError> {
        let sdp = content
            .get("offer")
            .and_then(|offer| offer.get("sdp"))
            .and_then(Value::as_str)
            .ok_or(RtcError::Malformed("an invite without offer.sdp"))?;
        Ok(Self {
            call_id: call_id.to_owned(),
            party_id: party_of(content).unwrap_or("legacy").to_owned(),
            lifetime: content.get("lifetime").and_then(Value::as_u64),
            sdp: sdp.to_owned(),
        })
    }
}

/// What can go wrong with a link.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::Error),
    /// Relay-only ICE with no usable TURN server (`turn:` over UDP).
    #[error("relay-only ICE needs a TURN server over UDP")]
    NoRelay,
    /// A signal from the peer that cannot be used.
    #[error("malformed signal: {0}")]
    Malformed(&'static str),
    /// The channel is not open (yet, or any more).
    #[error("the data channel is not open")]
    NotOpen,
    /// A message over [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes is over {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    /// The channel's buffer did not drain within [`RtcConfig::stall_timeout`].
    #[error("the data channel did not drain in time")]
    Stalled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Caller,
    Callee,
}

/// What the peer's signals have set so far.
#[derive(Default)]
struct Remote {
    /// The remote description is set.
    described: bool,
    /// The peer's `party_id`, once its invite or answer named it.
    party_id: Option<String>,
    /// Candidates that came before the remote description.
    early: Vec<RTCIceCandidateInit>,
}

struct Inner {
    pc: Arc<RTCPeerConnection>,
    channel: SyncMutex<Option<Arc<RTCDataChannel>>>,
    call_id: String,
    party_id: String,
    role: Role,
    config: RtcConfig,
    remote: Mutex<Remote>,
    /// The `a=mid` of our description, for our candidates' `sdpMid`.
    mid: SyncMutex<String>,
    events: mpsc::Sender<LinkEvent>,
    /// True once [`LinkEvent::Open`] is queued (or the link ended); messages wait for it, so they
    /// never come first.
    open: watch::Sender<bool>,
    /// Set once the terminal event is queued.
    ended: AtomicBool,
    /// Woken when the channel's buffer drains to `buffered_low`, and when the link ends.
    drained: Notify,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pc = self.pc.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// One peer connection with one data channel. Cheap to clone; the connection is closed by
/// [`PeerLink::hangup`], [`PeerLink::close`], the peer's hangup, or when every clone is dropped.
#[derive(Clone)]
pub struct PeerLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("call_id", &self.inner.call_id)
            .field("role", &self.inner.role)
            .finish_non_exhaustive()
    }
}

impl PeerLink {
    /// Starts a call: a new peer connection with the data channel, and the `m.call.invite` to send
    /// first (before any [`LinkEvent::Signal`]). `party_id` is this device's (its device id).
    #[tracing::instrument(name = "rtc.call", skip_all)]
    pub async fn call(
        config: RtcConfig,
        party_id: &str,
    ) -> Result<(PeerLink, LinkEvents, OutgoingSignal), RtcError> {
        let call_id = new_call_id();
        let (link, events, mut candidates) =
            Self::new(config, call_id.clone(), party_id, Role::Caller).await?;
        let inner = &link.inner;
        let init = RTCDataChannelInit {
            ordered: Some(inner.config.channel.ordered),
            max_retransmits: inner.config.channel.max_retransmits,
            max_packet_life_time: inner.config.channel.max_packet_life_time,
            ..Default::default()
        };
        let channel = inner.pc.create_data_channel(CHANNEL_LABEL, Some(init)).await?;
        wire_channel(inner, &channel);
        let offer = inner.pc.create_offer(None).await?;
        inner.pc.set_local_description(offer.clone()).await?;
        // As the answer (below): the callee then knows our first candidates when it starts its
        // checks, and through TURN its first check makes its allocation's permission for ours.
        let taken = first_candidate(&mut candidates, &inner.config).await;
        let offer = inner.pc.local_description().await.unwrap_or(offer);
        link.start_trickle(&offer.sdp, taken, candidates);
        let lifetime = u64::try_from(inner.config.invite_lifetime.as_millis()).unwrap_or(u64::MAX);
        let content = link.content(json!({
            "lifetime": lifetime,
            "offer": { "type": "offer", "sdp": offer.sdp },
        }));
        Ok((link, events, OutgoingSignal { call_id, event_type: EventType::Invite, content }))
    }

    /// Answers `invite`: a new peer connection that takes the caller's data channel, and the
    /// `m.call.answer` to send first (before any [`LinkEvent::Signal`]).
    #[tracing::instrument(name = "rtc.answer", skip_all)]
    pub async fn answer(
        config: RtcConfig,
        party_id: &str,
        invite: &Invite,
    ) -> Result<(PeerLink, LinkEvents, OutgoingSignal), RtcError> {
        let (link, events, mut candidates) =
            Self::new(config, invite.call_id.clone(), party_id, Role::Callee).await?;
        let inner = &link.inner;
        let weak = Arc::downgrade(inner);
        inner.pc.on_data_channel(Box::new(move |channel| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(inner) = weak.upgrade() else { return };
                let mut slot = inner.channel.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if channel.label() != CHANNEL_LABEL || slot.is_some() {
                    tracing::debug!(label = channel.label(), "rtc.channel: not ours, ignored");
                    return;
                }
                *slot = Some(channel.clone());
                drop(slot);
                wire_channel(&inner, &channel);
            })
        }));
        {
            let mut remote = inner.remote.lock().await;
            inner.pc.set_remote_description(RTCSessionDescription::offer(invite.sdp.clone())?).await?;
            remote.described = true;
            remote.party_id = Some(invite.party_id.clone());
        }
        let answer = inner.pc.create_answer(None).await?;
        inner.pc.set_local_description(answer.clone()).await?;
        // The answer carries the candidates gathered by then. Trickled after it, they raced our
        // own connectivity checks: a check that reached the caller first made us a peer-reflexive
        // candidate there, the host or relay candidate that followed made a second pair on the
        // same addresses, and `webrtc` 0.17's controlling agent only nominated at its next
        // 200 ms tick (an upgrade took 210 ms instead of a few in a third of the runs).
        let taken = first_candidate(&mut candidates, &inner.config).await;
        let answer = inner.pc.local_description().await.unwrap_or(answer);
        link.start_trickle(&answer.sdp, taken, candidates);
        let content = link.content(json!({ "answer": { "type": "answer", "sdp": answer.sdp } }));
        let call_id = invite.call_id.clone();
        Ok((link, events, OutgoingSignal { call_id, event_type: EventType::Answer, content }))
    }

    async fn new(
        config: RtcConfig,
        call_id: String,
        party_id: &str,
        role: Role,
    ) -> Result<(PeerLink, LinkEvents, mpsc::Receiver<Option<RTCIceCandidate>>), RtcError> {
        let mut settings = SettingEngine::default();
        // The defaults wait before they accept a pair that is not host/host: 2 s for a relay pair,
        // 1 s for a peer-reflexive one (the peer's check arrived before its candidate did, as it
        // often does when candidates trickle through Switchboard: on a routed LAN this alone made
        // an upgrade take 1,015 ms instead of a few), 0.5 s for server-reflexive. A payment node
        // wants the first pair that works; a waiting better pair gains it less than the wait costs.
        settings.set_relay_acceptance_min_wait(Some(Duration::ZERO));
        settings.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
        settings.set_srflx_acceptance_min_wait(Some(Duration::ZERO));
        settings.set_include_loopback_candidate(config.include_loopback);
        let api = APIBuilder::new().with_setting_engine(settings).build();
        let ice_servers = usable_ice_servers(config.ice_servers.as_ref());
        if config.relay_only && !ice_servers.iter().flat_map(|s| &s.urls).any(|url| url.starts_with("turn:"))
        {
            return Err(RtcError::NoRelay);
        }
        let rtc_config = RTCConfiguration {
            ice_servers,
            ice_transport_policy: if config.relay_only {
                RTCIceTransportPolicy::Relay
            } else {
                RTCIceTransportPolicy::All
            },
            ..Default::default()
        };
        let pc = Arc::new(api.new_peer_connection(rtc_config).await?);
        let (events_tx, events) = mpsc::channel(config.events_capacity.max(2));
        let inner = Arc::new(Inner {
            pc,
            channel: SyncMutex::new(None),
            call_id,
            party_id: party_id.to_owned(),
            role,
            config,
            remote: Mutex::new(Remote::default()),
            mid: SyncMutex::new("0".to_owned()),
            events: events_tx,
            open: watch::Sender::new(false),
            ended: AtomicBool::new(false),
            drained: Notify::new(),
        });
        // Candidates are queued from the moment gathering starts (the local description) and
        // batched once the invite or answer has been made.
        let (candidates_tx, candidates) = mpsc::channel(CANDIDATE_QUEUE);
        inner.pc.on_ice_candidate(Box::new(move |candidate| {
            if candidates_tx.try_send(candidate).is_err() {
                tracing::warn!("rtc.candidates: queue full, a local candidate dropped");
            }
            Box::pin(async {})
        }));
        let weak = Arc::downgrade(&inner);
        inner.pc.on_peer_connection_state_change(Box::new(move |state| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(inner) = weak.upgrade() else { return };
                tracing::debug!(call_id = %inner.call_id, ?state, "rtc.state");
                match state {
                    RTCPeerConnectionState::Failed => {
                        end(&inner, LinkEvent::Failed("ICE or DTLS failed".to_owned()));
                    }
                    RTCPeerConnectionState::Closed => end(&inner, LinkEvent::Closed),
                    _ => {}
                }
            })
        }));
        Ok((PeerLink { inner }, LinkEvents { events }, candidates))
    }

    /// Batches the local candidates into `m.call.candidates` signals: whatever is queued when the
    /// batcher runs, up to `candidates_per_signal`, the last one followed by the end-of-candidates
    /// marker. `taken` came out of `candidates` already and goes first; those that `sdp` carries
    /// are not sent again.
    fn start_trickle(
        &self,
        sdp: &str,
        taken: Vec<Option<RTCIceCandidate>>,
        mut candidates: mpsc::Receiver<Option<RTCIceCandidate>>,
    ) {
        if let Some(mid) = sdp.lines().find_map(|line| line.strip_prefix("a=mid:")) {
            mid.trim()
                .clone_into(&mut self.inner.mid.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        }
        let in_sdp: HashSet<String> = sdp
            .lines()
            .filter_map(|line| line.strip_prefix("a="))
            .filter(|attribute| attribute.starts_with("candidate:"))
            .map(|attribute| attribute.trim().to_owned())
            .collect();
        let weak = Arc::downgrade(&self.inner);
        let per_signal = self.inner.config.candidates_per_signal.max(1);
        tokio::spawn(async move {
            let mut taken = taken.into_iter();
            let mut done = false;
            // One pass per batch; gathering ends with `None`, so the loop ends with it.
            while !done {
                let next = match taken.next() {
                    Some(next) => next,
                    None => match candidates.recv().await {
                        Some(next) => next,
                        None => break,
                    },
                };
                let mut batch = vec![next];
                while batch.len() < per_signal {
                    match candidates.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let Some(inner) = weak.upgrade() else { break };
                let mid = inner.mid.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                let mut list = Vec::new();
                for candidate in batch {
                    let Some(candidate) = candidate else {
                        done = true;
                        list.push(json!({ "candidate": "", "sdpMid": mid, "sdpMLineIndex": 0 }));
                        break;
                    };
                    match candidate.to_json() {
                        Ok(init) if in_sdp.contains(&init.candidate) => {}
                        Ok(init) => list.push(json!({
                            "candidate": init.candidate, "sdpMid": mid, "sdpMLineIndex": 0,
                        })),
                        Err(error) => tracing::warn!(%error, "rtc.candidates: a local candidate not encoded"),
                    }
                }
                if list.is_empty() {
                    continue;
                }
                let link = PeerLink { inner };
                let content = link.content(json!({ "candidates": list }));
                let signal = OutgoingSignal {
                    call_id: link.inner.call_id.clone(),
                    event_type: EventType::Candidates,
                    content,
                };
                if link.inner.events.send(LinkEvent::Signal(signal)).await.is_err() {
                    break;
                }
            }
        });
    }

    /// Content with `call_id`, `party_id` and `version`, plus `fields`.
    fn content(&self, fields: Value) -> Map<String, Value> {
        let mut content = Map::new();
        content.insert("call_id".to_owned(), Value::from(self.inner.call_id.clone()));
        content.insert("party_id".to_owned(), Value::from(self.inner.party_id.clone()));
        content.insert("version".to_owned(), Value::from(VERSION));
        if let Value::Object(fields) = fields {
            content.extend(fields);
        }
        content
    }

    /// The call id (the invite's).
    pub fn call_id(&self) -> &str {
        &self.inner.call_id
    }

    /// This side's `party_id`.
    pub fn party_id(&self) -> &str {
        &self.inner.party_id
    }

    /// Whether this side started the call.
    pub fn is_caller(&self) -> bool {
        self.inner.role == Role::Caller
    }

    /// Applies a signal of this call from the peer: `m.call.answer` (caller), `m.call.candidates`,
    /// `m.call.select_answer` (callee: another device's answer was chosen: the link closes),
    /// `m.call.hangup` and `m.call.reject` (the link closes). Repeats and signals of other parties
    /// are ignored; a malformed candidate is skipped. Returns an error only for an answer that
    /// cannot be used.
    #[tracing::instrument(name = "rtc.signal", skip_all, fields(call_id = %self.inner.call_id, event_type = event_type.as_str()))]
    pub async fn handle_signal(
        &self,
        event_type: EventType,
        content: &Map<String, Value>,
    ) -> Result<(), RtcError> {
        let inner = &self.inner;
        let party = party_of(content);
        match event_type {
            EventType::Answer if inner.role == Role::Caller => {
                let mut remote = inner.remote.lock().await;
                if remote.described {
                    return Ok(());
                }
                let sdp = content
                    .get("answer")
                    .and_then(|answer| answer.get("sdp"))
                    .and_then(Value::as_str)
                    .ok_or(RtcError::Malformed("an answer without answer.sdp"))?;
                inner.pc.set_remote_description(RTCSessionDescription::answer(sdp.to_owned())?).await?;
                remote.described = true;
                let party = party.unwrap_or("legacy").to_owned();
                remote.party_id = Some(party.clone());
                let early = std::mem::take(&mut remote.early);
                drop(remote);
                for candidate in early {
                    self.add_candidate(candidate).await;
                }
                if party != RAIDEN_PARTY {
                    let content = self.content(json!({ "selected_party_id": party }));
                    let signal = OutgoingSignal {
                        call_id: inner.call_id.clone(),
                        event_type: EventType::SelectAnswer,
                        content,
                    };
                    // Not awaited: the caller of `handle_signal` is typically the reader of the events.
                    queue(inner, LinkEvent::Signal(signal));
                }
            }
            EventType::Candidates => {
                let list = content
                    .get("candidates")
                    .and_then(Value::as_array)
                    .ok_or(RtcError::Malformed("candidates without a list"))?;
                let mut remote = inner.remote.lock().await;
                if remote.party_id.as_deref().is_some_and(|known| party.is_some_and(|p| p != known)) {
                    return Ok(());
                }
                for candidate in list {
                    let Some(candidate) = candidate_init(candidate) else { continue };
                    if remote.described {
                        self.add_candidate(candidate).await;
                    } else if remote.early.len() < MAX_EARLY_CANDIDATES {
                        remote.early.push(candidate);
                    } else {
                        tracing::warn!("rtc.signal: too many candidates before the answer; dropped");
                    }
                }
            }
            EventType::SelectAnswer if inner.role == Role::Callee => {
                let selected = content.get("selected_party_id").and_then(Value::as_str);
                if selected.is_some_and(|selected| selected != inner.party_id) {
                    self.close().await;
                }
            }
            EventType::Hangup | EventType::Reject => self.close().await,
            _ => tracing::debug!("rtc.signal: not for this side; ignored"),
        }
        Ok(())
    }

    async fn add_candidate(&self, candidate: RTCIceCandidateInit) {
        // The end-of-candidates marker means nothing to `webrtc` 0.17.
        if candidate.candidate.is_empty() {
            return;
        }
        if let Err(error) = self.inner.pc.add_ice_candidate(candidate).await {
            tracing::debug!(%error, "rtc.signal: a remote candidate skipped");
        }
    }

    /// Sends a binary message. Waits first while the channel buffers more than
    /// [`RtcConfig::buffered_high`] bytes, until it has drained to [`RtcConfig::buffered_low`], so a
    /// fast sender does not pile up memory.
    pub async fn send(&self, message: Bytes) -> Result<(), RtcError> {
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(RtcError::TooLarge(message.len()));
        }
        self.writable().await?;
        let channel = self.open_channel()?;
        channel.send(&message).await.map_err(|error| match error {
            webrtc::Error::ErrClosedPipe => RtcError::NotOpen,
            other => RtcError::WebRtc(other),
        })?;
        Ok(())
    }

    /// Waits until the channel buffers at most [`RtcConfig::buffered_high`] bytes.
    pub async fn writable(&self) -> Result<(), RtcError> {
        let clock = &self.inner.config.clock;
        let deadline = clock.now() + self.inner.config.stall_timeout;
        // Each pass waits for a drain to `buffered_low` (below the high mark) or the end of the link,
        // so a few passes suffice; bounded in count and by the deadline.
        for _ in 0..64 {
            let drained = self.inner.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let channel = self.open_channel()?;
            if channel.buffered_amount().await <= self.inner.config.buffered_high {
                return Ok(());
            }
            tokio::select! {
                () = drained => {}
                () = clock.sleep_until(deadline) => return Err(RtcError::Stalled),
            }
        }
        Err(RtcError::Stalled)
    }

    /// Bytes the channel holds that the peer has not acknowledged.
    pub async fn buffered_amount(&self) -> usize {
        match self.channel() {
            Some(channel) => channel.buffered_amount().await,
            None => 0,
        }
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.open_channel().is_ok()
    }

    fn channel(&self) -> Option<Arc<RTCDataChannel>> {
        self.inner.channel.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn open_channel(&self) -> Result<Arc<RTCDataChannel>, RtcError> {
        match self.channel() {
            Some(channel)
                if !self.inner.ended.load(Ordering::SeqCst)
                    && channel.ready_state() == RTCDataChannelState::Open =>
            {
                Ok(channel)
            }
            _ => Err(RtcError::NotOpen),
        }
    }

    /// Hangs up: closes the link and gives the `m.call.hangup` to send.
    pub async fn hangup(&self, reason: &str) -> OutgoingSignal {
        self.close().await;
        let content = self.content(json!({ "reason": reason }));
        OutgoingSignal { call_id: self.inner.call_id.clone(), event_type: EventType::Hangup, content }
    }

    /// Closes the channel and the connection; [`LinkEvent::Closed`] follows unless the link had
    /// already ended.
    pub async fn close(&self) {
        if let Some(channel) = self.channel() {
            let _ = channel.close().await;
        }
        let _ = self.inner.pc.close().await;
        end(&self.inner, LinkEvent::Closed);
    }
}

/// Waits for our first local candidate (or the end of gathering, `None`) and returns what it took
/// from `candidates`: that one, or nothing if none came within
/// [`RtcConfig::first_candidate_wait`].
async fn first_candidate(
    candidates: &mut mpsc::Receiver<Option<RTCIceCandidate>>,
    config: &RtcConfig,
) -> Vec<Option<RTCIceCandidate>> {
    tokio::select! {
        first = candidates.recv() => first.into_iter().collect(),
        () = config.clock.sleep(config.first_candidate_wait) => Vec::new(),
    }
}

/// Keeps only the candidates of a signal's `content` that `keep` accepts, wherever they are: an
/// `m.call.candidates` list (whose end-of-candidates marker stays) and the `a=candidate:` lines of
/// an invite's offer or an answer's SDP (which carry the first candidates). `keep` gets the
/// candidate as `candidate:…`. For tests and operators who want ICE to try only some addresses,
/// such as loopback ones.
pub fn retain_candidates(content: &mut Map<String, Value>, keep: impl Fn(&str) -> bool) {
    if let Some(Value::Array(list)) = content.get_mut("candidates") {
        list.retain(|c| c["candidate"].as_str().is_some_and(|c| c.is_empty() || keep(c)));
    }
    for kind in ["offer", "answer"] {
        let Some(Value::String(sdp)) =
            content.get_mut(kind).and_then(|description| description.get_mut("sdp"))
        else {
            continue;
        };
        *sdp = sdp
            .split_inclusive('\n')
            .filter(|line| {
                line.strip_prefix("a=").is_none_or(|attribute| {
                    !attribute.starts_with("candidate:") || keep(attribute.trim_end())
                })
            })
            .collect();
    }
}

/// Queues the terminal event once, and wakes senders waiting for a drain. The event is queued by a
/// task of its own, behind whatever waits for room already: whoever ends the link (a `webrtc`
/// callback, [`PeerLink::close`]) never waits for the application to read its events.
fn end(inner: &Inner, event: LinkEvent) {
    if inner.ended.swap(true, Ordering::SeqCst) {
        return;
    }
    inner.drained.notify_waiters();
    // Messages waiting for an `Open` that will never come give up.
    inner.open.send_replace(true);
    queue(inner, event);
}

/// Queues an event from a task of its own (behind the events already waiting for room).
fn queue(inner: &Inner, event: LinkEvent) {
    let events = inner.events.clone();
    tokio::spawn(async move {
        let _ = events.send(event).await;
    });
}

/// Hooks a data channel's callbacks to the link.
fn wire_channel(inner: &Arc<Inner>, channel: &Arc<RTCDataChannel>) {
    if inner.role == Role::Caller {
        *inner.channel.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(channel.clone());
    }
    let weak = Arc::downgrade(inner);
    // Weak: the handler is stored in the channel itself.
    let opened = Arc::downgrade(channel);
    channel.on_open(Box::new(move || {
        Box::pin(async move {
            let (Some(inner), Some(opened)) = (weak.upgrade(), opened.upgrade()) else { return };
            // The threshold and its handler live in the opened stream, so they are set here.
            opened.set_buffered_amount_low_threshold(inner.config.buffered_low).await;
            let drained = Arc::downgrade(&inner);
            opened
                .on_buffered_amount_low(Box::new(move || {
                    if let Some(inner) = drained.upgrade() {
                        inner.drained.notify_waiters();
                    }
                    Box::pin(async {})
                }))
                .await;
            let path = path(&inner.pc).await;
            tracing::debug!(call_id = %inner.call_id, path = path.as_str(), "rtc.open");
            let _ = inner.events.send(LinkEvent::Open { path }).await;
            inner.open.send_replace(true);
        })
    }));
    let weak = Arc::downgrade(inner);
    channel.on_message(Box::new(move |message: DataChannelMessage| {
        let weak: Weak<Inner> = weak.clone();
        Box::pin(async move {
            let Some(inner) = weak.upgrade() else { return };
            let mut open = inner.open.subscribe();
            let _ = open.wait_for(|open| *open).await;
            // An ended link releases the waiters (see `end`); what comes after its end is dropped.
            if !inner.ended.load(Ordering::SeqCst) {
                let _ = inner.events.send(LinkEvent::Message(message.data)).await;
            }
        })
    }));
    let weak = Arc::downgrade(inner);
    channel.on_close(Box::new(move || {
        let weak = weak.clone();
        Box::pin(async move {
            if let Some(inner) = weak.upgrade() {
                end(&inner, LinkEvent::Closed);
            }
        })
    }));
    let weak = Arc::downgrade(inner);
    channel.on_error(Box::new(move |error| {
        let weak = weak.clone();
        Box::pin(async move {
            if let Some(inner) = weak.upgrade() {
                end(&inner, LinkEvent::Failed(format!("data channel: {error}")));
            }
        })
    }));
}

/// Relay if either side of the selected candidate pair is a relay candidate.
async fn path(pc: &RTCPeerConnection) -> Path {
    let pair = pc.sctp().transport().ice_transport().get_selected_candidate_pair().await;
    match pair {
        Some(pair)
            if pair.local.typ == RTCIceCandidateType::Relay
                || pair.remote.typ == RTCIceCandidateType::Relay =>
        {
            Path::Relay
        }
        Some(_) => Path::Direct,
        None => {
            tracing::warn!("rtc.open: no selected candidate pair; path taken as direct");
            Path::Direct
        }
    }
}

/// The servers `webrtc` 0.17 can use: `stun:` and `turn:` over UDP (it gathers nothing through
/// `turn:…?transport=tcp` or `turns:`).
fn usable_ice_servers(ice: Option<&IceServers>) -> Vec<RTCIceServer> {
    let Some(ice) = ice else { return Vec::new() };
    let urls: Vec<String> = ice
        .uris
        .iter()
        .filter(|uri| {
            let udp = !uri.contains("transport=") || uri.contains("transport=udp");
            (uri.starts_with("turn:") || uri.starts_with("stun:")) && udp
        })
        .cloned()
        .collect();
    if urls.is_empty() {
        return Vec::new();
    }
    vec![RTCIceServer { urls, username: ice.username.clone(), credential: ice.password.clone() }]
}

fn party_of(content: &Map<String, Value>) -> Option<&str> {
    content.get("party_id").and_then(Value::as_str)
}

/// A Matrix VoIP candidate (`{candidate, sdpMid, sdpMLineIndex}`).
fn candidate_init(value: &Value) -> Option<RTCIceCandidateInit> {
    let candidate = value.get("candidate")?.as_str()?.to_owned();
    let sdp_mid = value.get("sdpMid").and_then(Value::as_str).map(str::to_owned);
    let sdp_mline_index =
        value.get("sdpMLineIndex").and_then(Value::as_u64).and_then(|i| u16::try_from(i).ok());
    Some(RTCIceCandidateInit { candidate, sdp_mid, sdp_mline_index, username_fragment: None })
}

/// A fresh call id: 24 random characters of `[0-9a-zA-Z]` (Matrix's grammar is
/// `[0-9a-zA-Z._~-]{1,255}`).
fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_udp_turn_and_stun_uris_are_handed_to_webrtc() {
        let ice = IceServers {
            uris: vec![
                "turn:127.0.0.1:3478?transport=udp".to_owned(),
                "turn:127.0.0.1:3478?transport=tcp".to_owned(),
                "turns:relay.example.org:5349?transport=tcp".to_owned(),
                "stun:127.0.0.1:3478".to_owned(),
            ],
            username: "u".to_owned(),
            password: "p".to_owned(),
            ttl: 60,
        };
        let servers = usable_ice_servers(Some(&ice));
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].urls, ["turn:127.0.0.1:3478?transport=udp", "stun:127.0.0.1:3478"]);
        assert!(usable_ice_servers(None).is_empty());
    }

    #[test]
    fn call_ids_follow_the_matrix_grammar() {
        for _ in 0..100 {
            let id = new_call_id();
            assert!((1..=255).contains(&id.len()));
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b)), "{id}");
        }
        assert_ne!(new_call_id(), new_call_id());
    }

    #[test]
    fn an_invite_is_read_from_its_content_and_a_missing_offer_is_malformed() {
        let content = json!({ "party_id": "DEV", "version": "1", "lifetime": 30000,
                              "offer": { "type": "offer", "sdp": "v=0" } });
        let Value::Object(content) = content else { unreachable!() };
        let invite = Invite::parse("c1", &content).unwrap();
        assert_eq!(
            invite,
            Invite { call_id: "c1".into(), party_id: "DEV".into(), lifetime: Some(30000), sdp: "v=0".into() }
        );
        assert!(matches!(Invite::parse("c1", &Map::new()), Err(RtcError::Malformed(_))));
    }

    /// `content` with only its loopback candidates, so that ICE sends nothing beyond loopback.
    fn loopback_only(content: &Map<String, Value>) -> Map<String, Value> {
        let mut content = content.clone();
        retain_candidates(&mut content, is_loopback);
        content
    }

    /// A loopback candidate, IPv4 or IPv6.
    fn is_loopback(candidate: &str) -> bool {
        candidate.contains(" 127.0.0.1 ") || candidate.contains(" ::1 ")
    }

    #[test]
    fn retain_candidates_filters_the_list_and_the_sdp_and_keeps_the_rest() {
        let lo = "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host";
        let lan = "candidate:2 1 udp 2130706431 10.0.0.2 5001 typ host";
        let mut content = json!({
            "candidates": [{ "candidate": lo }, { "candidate": lan }, { "candidate": "" }],
            "answer": { "type": "answer", "sdp": format!("v=0\r\na=mid:0\r\na={lo}\r\na={lan}\r\na=end-of-candidates\r\n") },
        })
        .as_object()
        .unwrap()
        .clone();
        retain_candidates(&mut content, |candidate| candidate.contains(" 127.0.0.1 "));
        assert_eq!(content["candidates"], json!([{ "candidate": lo }, { "candidate": "" }]));
        assert_eq!(content["answer"]["sdp"], format!("v=0\r\na=mid:0\r\na={lo}\r\na=end-of-candidates\r\n"));
    }

    /// The `a=candidate:` lines of an invite's or answer's SDP (`kind`: "offer" or "answer"), as
    /// `candidate:…` strings.
    fn sdp_candidates(content: &Map<String, Value>, kind: &str) -> Vec<String> {
        let sdp = content[kind]["sdp"].as_str().expect("an SDP");
        sdp.lines()
            .filter_map(|line| line.strip_prefix("a="))
            .filter(|line| line.starts_with("candidate:"))
            .map(|line| line.trim().to_owned())
            .collect()
    }

    /// Asserts that `content`'s SDP (`kind`: "offer" or "answer") carries a host candidate, and
    /// returns its candidates. Which interface's comes first varies (loopback, IPv4, IPv6).
    fn with_host_candidate(content: &Map<String, Value>, kind: &str) -> Vec<String> {
        let candidates = sdp_candidates(content, kind);
        assert!(
            candidates.iter().any(|candidate| candidate.contains(" typ host")),
            "a host candidate is in the {kind}: {candidates:?}"
        );
        candidates
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_offer_and_the_answer_carry_the_first_candidates_and_do_not_trickle_them_again() {
        let config = RtcConfig { include_loopback: true, ..RtcConfig::default() };
        let (_a, _a_events, invite) = PeerLink::call(config.clone(), "A").await.unwrap();
        with_host_candidate(&invite.content, "offer");
        // The invite's candidates stay out of `b`'s way: `b` gets none of them but the loopback ones.
        let invite = Invite::parse(&invite.call_id, &loopback_only(&invite.content)).unwrap();
        let (_b, mut b_events, answer) = PeerLink::answer(config, "B", &invite).await.unwrap();
        let in_answer = with_host_candidate(&answer.content, "answer");

        let mut trickled = Vec::new();
        for _ in 0..64 {
            let event = tokio::time::timeout(Duration::from_secs(10), b_events.next())
                .await
                .expect("bob's candidates");
            let Some(LinkEvent::Signal(signal)) = event else { panic!("{event:?}") };
            let list = signal.content["candidates"].as_array().expect("candidates").clone();
            trickled.extend(list.iter().filter_map(|c| c["candidate"].as_str().map(str::to_owned)));
            if ends_candidates(&signal.content) {
                break;
            }
        }
        assert_eq!(trickled.last().map(String::as_str), Some(""), "gathering ends with the marker");
        // webrtc writes each candidate twice in an SDP (components 1 and 2); none is sent again.
        let repeated: Vec<_> = trickled.iter().filter(|c| in_answer.iter().any(|s| s == *c)).collect();
        assert!(repeated.is_empty(), "trickled again: {repeated:?}");
    }

    fn ends_candidates(content: &Map<String, Value>) -> bool {
        content["candidates"].as_array().is_some_and(|list| list.iter().any(|c| c["candidate"] == ""))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn candidates_before_the_answer_are_kept_and_a_loopback_pair_is_direct() {
        let config = RtcConfig { include_loopback: true, ..RtcConfig::default() };
        let (a, mut a_events, invite) = PeerLink::call(config.clone(), "A").await.unwrap();
        let invite = Invite::parse(&invite.call_id, &loopback_only(&invite.content)).unwrap();
        let (b, mut b_events, answer) = PeerLink::answer(config, "B", &invite).await.unwrap();
        let step = Duration::from_secs(10);

        // Every candidate of bob's reaches alice before his answer.
        for _ in 0..64 {
            let event = tokio::time::timeout(step, b_events.next()).await.expect("bob's candidates");
            let Some(LinkEvent::Signal(signal)) = event else { panic!("{event:?}") };
            assert_eq!(
                (signal.event_type, signal.content["party_id"].as_str()),
                (EventType::Candidates, Some("B"))
            );
            a.handle_signal(EventType::Candidates, &loopback_only(&signal.content)).await.unwrap();
            if ends_candidates(&signal.content) {
                break;
            }
        }
        a.handle_signal(EventType::Answer, &loopback_only(&answer.content)).await.unwrap();

        let (mut a_path, mut b_path) = (None, None);
        for _ in 0..256 {
            if a_path.is_some() && b_path.is_some() {
                break;
            }
            let event = tokio::time::timeout(step, async {
                tokio::select! {
                    event = a_events.next() => (true, event),
                    event = b_events.next() => (false, event),
                }
            })
            .await
            .expect("the channel opens");
            match event {
                (true, Some(LinkEvent::Signal(signal))) => {
                    b.handle_signal(signal.event_type, &loopback_only(&signal.content)).await.unwrap();
                }
                (true, Some(LinkEvent::Open { path })) => a_path = Some(path),
                (false, Some(LinkEvent::Open { path })) => b_path = Some(path),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((a_path, b_path), (Some(Path::Direct), Some(Path::Direct)));

        a.send(Bytes::from_static(b"over loopback")).await.unwrap();
        let event = tokio::time::timeout(step, b_events.next()).await.expect("the message");
        assert!(
            matches!(event, Some(LinkEvent::Message(ref bytes)) if bytes == "over loopback"),
            "{event:?}"
        );
        // Alice hangs up; bob's link closes on her hangup signal.
        let hangup = a.hangup("user_hangup").await;
        assert_eq!(hangup.content["reason"], "user_hangup");
        b.handle_signal(hangup.event_type, &hangup.content).await.unwrap();
        let event = tokio::time::timeout(step, b_events.next()).await.expect("bob's end");
        assert!(matches!(event, Some(LinkEvent::Closed)), "{event:?}");
        assert!(matches!(b.send(Bytes::from_static(b"late")).await, Err(RtcError::NotOpen)));
    }

    #[tokio::test]
    async fn relay_only_without_a_turn_server_is_refused() {
        let config = RtcConfig { relay_only: true, ..RtcConfig::default() };
        assert!(matches!(PeerLink::call(config, "DEV").await, Err(RtcError::NoRelay)));
    }
}
