//! The call broker: a sans-IO state machine that judges every WebRTC signal before the signalling
//! relay ([`crate::signalling`]) routes it, and keeps each call's state (Matrix VoIP v1, spec
//! `voip_events`, MSC2746).
//!
//! It does no IO and never reads a clock: every input carries `now_ms` (milliseconds, from the
//! caller's [`crate::clock::Clock`]), and the task around it sleeps until [`Calls::poll_timeout`].
//!
//! ```text
//! relay task                                   Calls
//! signal seen (socket or Matrix)   ──────────▶ signal(now, &Signal) -> Verdict
//! the invite reached the callee    ──────────▶ invite_delivered(now, call_id) -> held candidates
//! the invite could not be delivered ─────────▶ invite_failed(now, call_id) -> held candidates (dropped)
//! a `connected` frame              ──────────▶ connected(now, user, call_id)
//! sleep until poll_timeout()       ──────────▶ handle_timeout(now)
//! after each of the above          ◀────────── poll_event() -> Event (metrics, notices)
//! ```
//!
//! # Rules
//! - A call is named by its `call_id`. Its **caller** is the sender of the first invite seen for
//!   it, its **callee** that invite's `to_user`. Signals of a known call are accepted only between
//!   its two users (either direction); any other sender or recipient is refused
//!   ([`Refused::NotInCall`]). Answers from several of the callee's devices (`party_id`) are all
//!   forwarded; the caller's `select_answer` settles which one won.
//! - `call_id`, `from_user` and `to_user` must be 1 to 255 bytes ([`Refused::Malformed`]); the
//!   characters are not checked (Raiden's `<addr>|<peer>|<ts>` ids are accepted). An invite to
//!   oneself is refused. Everything else in `content` is optional to the broker and never makes it
//!   fail: the protocol layer validates signals.
//! - Signals of a call the broker has never seen (Switchboard restarted mid-call, or the invite
//!   came by a path it did not see) are **forwarded**: the broker never drops a signal it merely
//!   does not know about. Signals of a call that has ended (hangup, reject, expiry, glare) are
//!   [`Ignored::Late`] for [`Settings::remember_ended_ms`] after the end; after that the call is
//!   forgotten and its signals are unknown again.
//! - **Duplicates**: a signal equal to one already accepted in the same call (same sender, event
//!   type and content, whatever the device or the path: the Matrix echo of Switchboard's own
//!   masqueraded send, a client's retry) is [`Ignored::Duplicate`]. The last
//!   [`REMEMBERED_SIGNALS`] accepted signals of a call are remembered (as 64-bit hashes, object
//!   keys in any order). Refused signals are not remembered, so a retry is judged afresh.
//! - **Held candidates**: `m.call.candidates` from the caller before the invite was delivered
//!   ([`Calls::invite_delivered`]) are held ([`Verdict::Hold`]), at most
//!   [`Settings::max_held_candidates`] per call and [`Settings::max_held_bytes`] (approximate) over
//!   all calls; past either the sender is refused ([`Refused::TooManyHeld`]). `invite_delivered`
//!   releases them in arrival order; `invite_failed` ends the call (`Failed`) and hands them back so
//!   the relay can answer each with an error. A call that ends any other way drops what it held:
//!   its [`EventKind::Ended`] is the relay's cue to answer those senders with an error.
//! - **Invite lifetime**: the invite's `lifetime` (ms; [`Settings::default_invite_lifetime_ms`]
//!   when missing or not a whole number, at most [`Settings::max_invite_lifetime_ms`]). An invite
//!   not answered by then ends `Expired`; later signals of the call are late.
//! - **Connect timeout**: once answered, both users must report `connected` within
//!   [`Settings::connect_timeout_ms`] of the (first) answer, or the call ends `Failed`. When both
//!   have, the call is established and [`EventKind::Connected`] carries `upgrade_ms`, from the
//!   invite seen to the second `connected`. An established call no signal or `connected` touched
//!   for [`Settings::idle_established_ms`] is forgotten without an event (the data channel may
//!   well live on; its later signals are then unknown, so forwarded).
//! - **Glare** (deterministic, the Matrix VoIP rule): when B invites A (call Y) while A's invite to
//!   B (call X) is pending and unanswered, the call with the lexicographically lower `call_id`
//!   (byte order) wins, whichever arrived second. If Y wins, Y is forwarded and X ends
//!   `GlareLost`; if X wins, Y is not forwarded and ends `GlareLost` (its later signals are late).
//!   [`Verdict::Glare`] names the winner and the loser(s); both users are told by the relay. If X
//!   was already answered, it is not glare: Y is a second call, subject to the limits.
//! - **Ends**: hangup and reject (from either user) end the call and are forwarded once (a second
//!   one is late). The outcome: `Completed` if the call was established; otherwise `Rejected` for a
//!   reject, or for a hangup by the callee of an unanswered invite (how VoIP v0 clients decline);
//!   `Expired` for a hangup with reason `invite_timeout` before the answer (the caller's own expiry);
//!   `Failed` for any other hangup.
//! - **Limits**: a user takes part in at most [`Settings::max_live_calls_per_user`] pending calls
//!   (invited or answered, not yet established), as caller or callee; an invite past it, on either
//!   side, is refused ([`Refused::TooManyCalls`]); ending or establishing a call frees the slot. At
//!   most [`Settings::max_calls`] calls (pending, established and ended) are kept: a new call first
//!   pushes out the oldest ended call, then the longest-idle established one; if every call is
//!   pending, the invite is refused ([`Refused::Overloaded`]).
//! - Nothing panics on any input; `now_ms` going backwards is tolerated (timers then wait longer).

mod fingerprint;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use hashlink::LinkedHashMap;
use serde_json::Value;

use crate::signalling::{EventType, Signal};

/// The longest `call_id`, `from_user` or `to_user` accepted, in bytes (the Matrix limit for ids).
pub const MAX_ID_BYTES: usize = 255;

/// Accepted signals remembered per call to recognise duplicates.
pub const REMEMBERED_SIGNALS: usize = 64;

/// The broker's limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Pending calls (invited or answered, not yet established) a user may take part in, as caller
    /// or callee; an invite past it is refused. Default 16.
    pub max_live_calls_per_user: usize,
    /// The lifetime of an invite that names none. Default 60,000 ms.
    pub default_invite_lifetime_ms: u64,
    /// Invite lifetimes are clamped to this. Default 120,000 ms.
    pub max_invite_lifetime_ms: u64,
    /// An answered call not established (both `connected`) within this fails. Default 60,000 ms.
    pub connect_timeout_ms: u64,
    /// An established call with no signal and no `connected` for this long is forgotten. Default
    /// 3,600,000 ms.
    pub idle_established_ms: u64,
    /// Ended calls are remembered this long, to drop their late signals. Default 120,000 ms.
    pub remember_ended_ms: u64,
    /// Candidates signals held per call until its invite is delivered. Default 32.
    pub max_held_candidates: usize,
    /// Held candidates over all calls, in approximate bytes of content. Default 16 MiB.
    pub max_held_bytes: usize,
    /// Calls kept in memory (pending, established and ended). Default 100,000.
    pub max_calls: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_live_calls_per_user: 16,
            default_invite_lifetime_ms: 60_000,
            max_invite_lifetime_ms: 120_000,
            connect_timeout_ms: 60_000,
            idle_established_ms: 3_600_000,
            remember_ended_ms: 120_000,
            max_held_candidates: 32,
            max_held_bytes: 16 * 1024 * 1024,
            max_calls: 100_000,
        }
    }
}

/// What to do with a signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Route it to the peer.
    Forward,
    /// Candidates before the invite was delivered: held, released by [`Calls::invite_delivered`]
    /// (the relay answers the sender once they are routed).
    Hold,
    /// Drop it silently (count it).
    Ignore(Ignored),
    /// Do not route it; the sender gets an error.
    Refused(Refused),
    /// The invite met the peer's pending invite: see [`Glare`].
    Glare(Glare),
}

/// Why a signal is dropped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// Equal to a signal already accepted in this call.
    Duplicate,
    /// The call has ended (hangup, reject, expiry, glare).
    Late,
}

impl Ignored {
    /// A label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::Duplicate => "duplicate",
            Ignored::Late => "late",
        }
    }
}

/// Why a signal is refused (the sender gets an error frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The caller or the callee already takes part in `max_live_calls_per_user` pending calls.
    TooManyCalls,
    /// The call already holds `max_held_candidates`, or all calls hold `max_held_bytes`.
    TooManyHeld,
    /// The call exists between two other users.
    NotInCall,
    /// `max_calls` calls are pending: no room for another.
    Overloaded,
    /// What is wrong with the signal.
    Malformed(&'static str),
}

impl Refused {
    /// A stable code for error frames and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Refused::TooManyCalls => "too_many_calls",
            Refused::TooManyHeld => "too_many_held",
            Refused::NotInCall => "not_in_call",
            Refused::Overloaded => "overloaded",
            Refused::Malformed(_) => "malformed",
        }
    }

    /// A sentence for error frames.
    pub fn message(self) -> &'static str {
        match self {
            Refused::TooManyCalls => "too many pending calls for the caller or the callee",
            Refused::TooManyHeld => "too many candidates held before the invite was delivered",
            Refused::NotInCall => "this call is between other users",
            Refused::Overloaded => "too many calls in progress on this server",
            Refused::Malformed(what) => what,
        }
    }
}

/// The outcome of glare: two users invited each other. The two users are the judged invite's
/// sender and recipient; both are to be told (the loser's call ended, the winner's goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glare {
    /// The call that goes on (the lowest `call_id`).
    pub won_call_id: String,
    /// The calls that ended `GlareLost`: the incoming invite's call when it lost, else the peer's
    /// pending invites (usually one).
    pub lost_call_ids: Vec<String>,
    /// Whether the incoming invite won, so is to be routed.
    pub forward: bool,
}

/// Something that happened to a call, for metrics and notices; drained with
/// [`Calls::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub call_id: String,
    pub caller: String,
    pub callee: String,
    pub kind: EventKind,
    /// Whether this instance counts the call in its metrics ([`Counted`]).
    pub counted: bool,
}

/// Which instance counts a call in its `switchboard_calls_*` metrics, so that a sum over the
/// instances of a cluster counts each call once. Every instance that sees a call's signals follows
/// it (its timers, glare, `connected` reports); one counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Count it here: the invite came from a socket here, or from Matrix to a callee connected here.
    Here,
    /// Another instance counts it (the invite crossed from there), or none does (a Matrix invite
    /// to a user connected nowhere).
    Elsewhere,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An invite was accepted (forwarded): a new pending call.
    Started,
    /// Both users reported `connected`; `upgrade_ms` from the invite seen to the second report.
    Connected { upgrade_ms: u64 },
    /// The call ended. Every call that started ends at most once; an invite that loses glare on
    /// arrival ends `GlareLost` without having started.
    Ended { outcome: Outcome },
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Hung up (or rejected) after it was established.
    Completed,
    /// Rejected before it was established (or declined by the callee's hangup before the answer).
    Rejected,
    /// Hung up before it was established, not connected in time, or the invite not deliverable.
    Failed,
    /// The invite's lifetime passed unanswered.
    Expired,
    /// Lost glare to the peer's invite.
    GlareLost,
}

impl Outcome {
    /// A label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Expired => "expired",
            Outcome::GlareLost => "glare_lost",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Invited, not answered.
    Invited,
    /// Answered, not both connected.
    Answered,
    /// Both connected.
    Established,
    /// Remembered to drop late signals.
    Ended,
}

impl Phase {
    fn pending(self) -> bool {
        matches!(self, Phase::Invited | Phase::Answered)
    }
}

#[derive(Debug)]
struct Call {
    caller: Arc<str>,
    callee: Arc<str>,
    phase: Phase,
    invited_ms: u64,
    /// When `handle_timeout` next acts on it; always mirrored in `Calls::timers`.
    deadline: u64,
    invite_delivered: bool,
    /// `connected` reported by [caller, callee].
    connected: [bool; 2],
    held: Vec<Signal>,
    held_bytes: usize,
    /// Hashes of the last accepted signals, oldest first.
    seen: VecDeque<u64>,
    /// Whether its events count in this instance's metrics.
    counted: bool,
}

impl Call {
    /// 0 for the caller, 1 for the callee, if the signal goes between them.
    fn side_of(&self, signal: &Signal) -> Option<usize> {
        let (from, to) = (signal.from_user.as_str(), signal.to_user.as_str());
        if from == &*self.caller && to == &*self.callee {
            Some(0)
        } else if from == &*self.callee && to == &*self.caller {
            Some(1)
        } else {
            None
        }
    }

    fn remember(&mut self, fingerprint: u64) {
        if self.seen.len() >= REMEMBERED_SIGNALS {
            self.seen.pop_front();
        }
        self.seen.push_back(fingerprint);
    }
}

/// The call broker. See the module documentation for the rules.
#[derive(Debug)]
pub struct Calls {
    settings: Settings,
    by_id: HashMap<Arc<str>, Call>,
    /// (deadline, call_id): one entry per call.
    timers: BTreeSet<(u64, Arc<str>)>,
    /// Ended calls, oldest end first.
    ended: LinkedHashMap<Arc<str>, ()>,
    /// Established calls, least recently active first.
    established: LinkedHashMap<Arc<str>, ()>,
    /// The pending calls each user takes part in (at most `max_live_calls_per_user` each).
    pending_by_user: HashMap<Arc<str>, Vec<Arc<str>>>,
    pending: usize,
    held_bytes: usize,
    events: VecDeque<Event>,
}

impl Calls {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            by_id: HashMap::new(),
            timers: BTreeSet::new(),
            ended: LinkedHashMap::new(),
            established: LinkedHashMap::new(),
            pending_by_user: HashMap::new(),
            pending: 0,
            held_bytes: 0,
            events: VecDeque::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Judges a signal seen from a client socket here, before it is routed; a call it starts is
    /// counted here.
    pub fn signal(&mut self, now_ms: u64, signal: &Signal) -> Verdict {
        self.signal_counted(now_ms, signal, Counted::Here)
    }

    /// Judges a signal, before it is routed; `counted` says whether a call it starts counts in this
    /// instance's metrics.
    pub fn signal_counted(&mut self, now_ms: u64, signal: &Signal, counted: Counted) -> Verdict {
        if let Err(what) = check_ids(signal) {
            return Verdict::Refused(Refused::Malformed(what));
        }
        let (hash, bytes) = fingerprint::fingerprint(signal);
        if self.by_id.contains_key(signal.call_id.as_str()) {
            self.known_call(now_ms, signal, hash, bytes)
        } else if signal.event_type == EventType::Invite {
            self.new_call(now_ms, signal, hash, counted == Counted::Here)
        } else {
            Verdict::Forward
        }
    }

    /// The invite of `call_id` reached the callee (its socket has it or the homeserver accepted
    /// it): returns the candidates held for the call, to be routed now, in arrival order.
    pub fn invite_delivered(&mut self, now_ms: u64, call_id: &str) -> Vec<Signal> {
        let _ = now_ms;
        let Some(call) = self.by_id.get_mut(call_id) else {
            return Vec::new();
        };
        if call.phase == Phase::Ended {
            return Vec::new();
        }
        call.invite_delivered = true;
        self.held_bytes = self.held_bytes.saturating_sub(call.held_bytes);
        call.held_bytes = 0;
        std::mem::take(&mut call.held)
    }

    /// The invite of `call_id` could not be delivered: the call ends `Failed` (if it was pending)
    /// and its held candidates are returned, not to be routed (answer their senders with an error).
    pub fn invite_failed(&mut self, now_ms: u64, call_id: &str) -> Vec<Signal> {
        let Some(call) = self.by_id.get_mut(call_id) else {
            return Vec::new();
        };
        if !call.phase.pending() {
            return Vec::new();
        }
        self.held_bytes = self.held_bytes.saturating_sub(call.held_bytes);
        call.held_bytes = 0;
        let held = std::mem::take(&mut call.held);
        self.end(now_ms, call_id, Outcome::Failed);
        held
    }

    /// The other user of `call_id`, if `user_id` is one of its two users.
    pub fn other_user(&self, call_id: &str, user_id: &str) -> Option<Arc<str>> {
        let call = self.by_id.get(call_id)?;
        if *call.caller == *user_id {
            Some(call.callee.clone())
        } else if *call.callee == *user_id {
            Some(call.caller.clone())
        } else {
            None
        }
    }

    /// `user_id` reports its data channel for `call_id` open. Unknown and ended calls, and users
    /// not in the call, are ignored.
    pub fn connected(&mut self, now_ms: u64, user_id: &str, call_id: &str) {
        let Some((id, call)) = self.by_id.get_key_value(call_id) else {
            return;
        };
        let side = if user_id == &*call.caller {
            0
        } else if user_id == &*call.callee {
            1
        } else {
            return;
        };
        let id = id.clone();
        match call.phase {
            Phase::Ended => {}
            Phase::Established => self.touch(now_ms, &id),
            Phase::Invited | Phase::Answered => {
                let call = self.by_id.get_mut(&id).expect("looked up above");
                call.connected[side] = true;
                if call.connected == [true, true] {
                    self.establish(now_ms, &id);
                }
            }
        }
    }

    /// The next time [`Calls::handle_timeout`] has work, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.timers.first().map(|(deadline, _)| *deadline)
    }

    /// Expires invites, fails calls not established in time, forgets idle and ended calls: all
    /// that is due at `now_ms`.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        while let Some((deadline, id)) = self.timers.first() {
            if *deadline > now_ms {
                break;
            }
            let id = id.clone();
            match self.by_id.get(&id).map(|call| call.phase) {
                Some(Phase::Invited) => self.end(now_ms, &id, Outcome::Expired),
                Some(Phase::Answered) => self.end(now_ms, &id, Outcome::Failed),
                Some(Phase::Established | Phase::Ended) => self.forget(&id),
                None => {
                    // Unreachable by construction; drop the stray timer rather than loop.
                    self.timers.pop_first();
                }
            }
        }
    }

    /// The next event (call started, connected, ended), oldest first. Drain after each input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Pending calls: invited or answered, not yet established (a gauge).
    pub fn live_calls(&self) -> usize {
        self.pending
    }

    /// Established calls still remembered (a gauge).
    pub fn established_calls(&self) -> usize {
        self.established.len()
    }

    /// All calls in memory: pending, established and ended (at most `max_calls`).
    pub fn remembered_calls(&self) -> usize {
        self.by_id.len()
    }

    /// Approximate bytes of candidates held over all calls.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    fn known_call(&mut self, now_ms: u64, signal: &Signal, hash: u64, bytes: usize) -> Verdict {
        let settings = &self.settings;
        let Some((id, call)) = self.by_id.get_key_value(signal.call_id.as_str()) else {
            return Verdict::Forward;
        };
        let id = id.clone();
        let Some(side) = call.side_of(signal) else {
            return Verdict::Refused(Refused::NotInCall);
        };
        if call.seen.contains(&hash) {
            return Verdict::Ignore(Ignored::Duplicate);
        }
        let phase = call.phase;
        if phase == Phase::Ended {
            return Verdict::Ignore(Ignored::Late);
        }
        let verdict = match signal.event_type {
            EventType::Invite if side == 1 => {
                Verdict::Refused(Refused::Malformed("call_id is in use by the other side's call"))
            }
            EventType::Candidates if side == 0 && phase.pending() && !call.invite_delivered => {
                if call.held.len() >= settings.max_held_candidates
                    || self.held_bytes.saturating_add(bytes) > settings.max_held_bytes
                {
                    Verdict::Refused(Refused::TooManyHeld)
                } else {
                    Verdict::Hold
                }
            }
            _ => Verdict::Forward,
        };
        if !matches!(verdict, Verdict::Forward | Verdict::Hold) {
            return verdict;
        }
        let connect_deadline = now_ms.saturating_add(settings.connect_timeout_ms);
        let call = self.by_id.get_mut(&id).expect("looked up above");
        call.remember(hash);
        if verdict == Verdict::Hold {
            call.held.push(signal.clone());
            call.held_bytes += bytes;
            self.held_bytes += bytes;
            return verdict;
        }
        match signal.event_type {
            EventType::Answer if side == 1 && phase == Phase::Invited => {
                call.phase = Phase::Answered;
                self.set_deadline(&id, connect_deadline);
            }
            EventType::Hangup | EventType::Reject => {
                let outcome = end_outcome(signal, side, phase);
                self.end(now_ms, &id, outcome);
            }
            _ if phase == Phase::Established => self.touch(now_ms, &id),
            _ => {}
        }
        verdict
    }

    fn new_call(&mut self, now_ms: u64, signal: &Signal, hash: u64, counted: bool) -> Verdict {
        if signal.from_user == signal.to_user {
            return Verdict::Refused(Refused::Malformed("an invite to oneself"));
        }
        // The callee's pending, unanswered invites to the caller: glare.
        let rivals: Vec<Arc<str>> = self
            .pending_by_user
            .get(signal.to_user.as_str())
            .into_iter()
            .flatten()
            .filter(|id| {
                self.by_id.get(*id).is_some_and(|call| {
                    call.phase == Phase::Invited
                        && *call.caller == *signal.to_user
                        && *call.callee == *signal.from_user
                })
            })
            .cloned()
            .collect();
        let lowest_rival = rivals.iter().min().cloned();
        if let Some(lowest) = lowest_rival
            && *lowest < *signal.call_id
        {
            // The pending invite wins; this one ends on arrival, remembered so that its
            // candidates are dropped as late.
            if self.make_room() {
                self.insert(now_ms, signal, hash, Phase::Ended, counted);
            }
            self.events.push_back(Event {
                call_id: signal.call_id.clone(),
                caller: signal.from_user.clone(),
                callee: signal.to_user.clone(),
                kind: EventKind::Ended { outcome: Outcome::GlareLost },
                counted,
            });
            return Verdict::Glare(Glare {
                won_call_id: lowest.to_string(),
                lost_call_ids: vec![signal.call_id.clone()],
                forward: false,
            });
        }
        // The rivals (if any) lose: their slots are freed for this call.
        let limit = self.settings.max_live_calls_per_user;
        let count = |user: &str| self.pending_by_user.get(user).map_or(0, Vec::len);
        if count(&signal.from_user).saturating_sub(rivals.len()) >= limit
            || count(&signal.to_user).saturating_sub(rivals.len()) >= limit
        {
            return Verdict::Refused(Refused::TooManyCalls);
        }
        if !self.make_room() {
            return Verdict::Refused(Refused::Overloaded);
        }
        for rival in &rivals {
            self.end(now_ms, rival, Outcome::GlareLost);
        }
        self.insert(now_ms, signal, hash, Phase::Invited, counted);
        if rivals.is_empty() {
            Verdict::Forward
        } else {
            Verdict::Glare(Glare {
                won_call_id: signal.call_id.clone(),
                lost_call_ids: rivals.iter().map(ToString::to_string).collect(),
                forward: true,
            })
        }
    }

    /// Makes room for one more call if `max_calls` are kept: forgets the oldest ended call, else
    /// the longest-idle established one. False if every call is pending.
    fn make_room(&mut self) -> bool {
        if self.by_id.len() < self.settings.max_calls {
            return true;
        }
        let oldest = self.ended.front().or_else(|| self.established.front());
        let Some((id, ())) = oldest else {
            return false;
        };
        let id = id.clone();
        self.forget(&id);
        self.by_id.len() < self.settings.max_calls
    }

    /// Stores a new call from its invite, pending (and announced) or ended on arrival.
    fn insert(&mut self, now_ms: u64, signal: &Signal, hash: u64, phase: Phase, counted: bool) {
        let settings = &self.settings;
        let id: Arc<str> = Arc::from(signal.call_id.as_str());
        let deadline = if phase == Phase::Ended {
            now_ms.saturating_add(settings.remember_ended_ms)
        } else {
            let lifetime = signal
                .content
                .get("lifetime")
                .and_then(Value::as_u64)
                .unwrap_or(settings.default_invite_lifetime_ms)
                .min(settings.max_invite_lifetime_ms);
            now_ms.saturating_add(lifetime)
        };
        let mut call = Call {
            caller: Arc::from(signal.from_user.as_str()),
            callee: Arc::from(signal.to_user.as_str()),
            phase,
            invited_ms: now_ms,
            deadline,
            invite_delivered: false,
            connected: [false; 2],
            held: Vec::new(),
            held_bytes: 0,
            seen: VecDeque::new(),
            counted,
        };
        call.remember(hash);
        if phase == Phase::Ended {
            self.ended.insert(id.clone(), ());
        } else {
            for user in [&call.caller, &call.callee] {
                self.pending_by_user.entry(user.clone()).or_default().push(id.clone());
            }
            self.pending += 1;
            self.events.push_back(Event {
                call_id: signal.call_id.clone(),
                caller: signal.from_user.clone(),
                callee: signal.to_user.clone(),
                kind: EventKind::Started,
                counted,
            });
        }
        self.timers.insert((deadline, id.clone()));
        self.by_id.insert(id, call);
    }

    fn set_deadline(&mut self, id: &Arc<str>, deadline: u64) {
        if let Some(call) = self.by_id.get_mut(id) {
            self.timers.remove(&(call.deadline, id.clone()));
            call.deadline = deadline;
            self.timers.insert((deadline, id.clone()));
        }
    }

    /// Activity on an established call: it is the most recently active, idle from now.
    fn touch(&mut self, now_ms: u64, id: &Arc<str>) {
        self.established.to_back(id);
        self.set_deadline(id, now_ms.saturating_add(self.settings.idle_established_ms));
    }

    fn leave_pending(&mut self, id: &Arc<str>) {
        let Some(call) = self.by_id.get(id) else {
            return;
        };
        if !call.phase.pending() {
            return;
        }
        for user in [&call.caller, &call.callee] {
            if let Some(ids) = self.pending_by_user.get_mut(user) {
                ids.retain(|other| other != id);
                if ids.is_empty() {
                    self.pending_by_user.remove(user);
                }
            }
        }
        self.pending = self.pending.saturating_sub(1);
    }

    fn establish(&mut self, now_ms: u64, id: &Arc<str>) {
        self.leave_pending(id);
        let Some(call) = self.by_id.get_mut(id) else {
            return;
        };
        call.phase = Phase::Established;
        let event = Event {
            call_id: id.to_string(),
            caller: call.caller.to_string(),
            callee: call.callee.to_string(),
            kind: EventKind::Connected { upgrade_ms: now_ms.saturating_sub(call.invited_ms) },
            counted: call.counted,
        };
        self.events.push_back(event);
        self.established.insert(id.clone(), ());
        self.touch(now_ms, id);
    }

    /// Ends a pending or established call: remembered as ended, its held candidates dropped.
    fn end(&mut self, now_ms: u64, id: &str, outcome: Outcome) {
        let Some((id, call)) = self.by_id.get_key_value(id) else {
            return;
        };
        if call.phase == Phase::Ended {
            return;
        }
        let id = id.clone();
        self.leave_pending(&id);
        self.established.remove(&id);
        let call = self.by_id.get_mut(&id).expect("looked up above");
        call.phase = Phase::Ended;
        self.held_bytes = self.held_bytes.saturating_sub(call.held_bytes);
        call.held_bytes = 0;
        call.held = Vec::new();
        let event = Event {
            call_id: id.to_string(),
            caller: call.caller.to_string(),
            callee: call.callee.to_string(),
            kind: EventKind::Ended { outcome },
            counted: call.counted,
        };
        self.events.push_back(event);
        self.ended.insert(id.clone(), ());
        self.set_deadline(&id, now_ms.saturating_add(self.settings.remember_ended_ms));
    }

    /// Drops every trace of a call.
    fn forget(&mut self, id: &Arc<str>) {
        self.leave_pending(id);
        let Some(call) = self.by_id.remove(id) else {
            return;
        };
        self.timers.remove(&(call.deadline, id.clone()));
        self.ended.remove(id);
        self.established.remove(id);
        self.held_bytes = self.held_bytes.saturating_sub(call.held_bytes);
    }

    /// Checks every internal index against the calls (tests only).
    #[cfg(test)]
    fn check_consistency(&self) {
        assert_eq!(self.timers.len(), self.by_id.len(), "one timer per call");
        let mut pending = 0;
        let mut held = 0;
        for (id, call) in &self.by_id {
            assert!(self.timers.contains(&(call.deadline, id.clone())), "{id}: timer");
            assert_eq!(self.ended.contains_key(id), call.phase == Phase::Ended, "{id}: ended");
            assert_eq!(
                self.established.contains_key(id),
                call.phase == Phase::Established,
                "{id}: established"
            );
            for user in [&call.caller, &call.callee] {
                let listed = self.pending_by_user.get(user).is_some_and(|ids| ids.contains(id));
                assert_eq!(listed, call.phase.pending(), "{id}: pending for {user}");
            }
            pending += usize::from(call.phase.pending());
            held += call.held_bytes;
            assert!(call.held.len() <= self.settings.max_held_candidates);
            assert!(call.seen.len() <= REMEMBERED_SIGNALS);
        }
        assert_eq!(self.pending, pending, "pending count");
        assert_eq!(self.held_bytes, held, "held bytes");
        assert!(self.held_bytes <= self.settings.max_held_bytes);
        assert!(self.by_id.len() <= self.settings.max_calls);
        for (user, ids) in &self.pending_by_user {
            assert!(!ids.is_empty());
            assert!(ids.len() <= self.settings.max_live_calls_per_user, "{user}: limit");
        }
    }
}

fn check_ids(signal: &Signal) -> Result<(), &'static str> {
    let ok = |id: &str| !id.is_empty() && id.len() <= MAX_ID_BYTES;
    if !ok(&signal.call_id) {
        Err("call_id must be 1 to 255 bytes")
    } else if !ok(&signal.to_user) {
        Err("the recipient's user id must be 1 to 255 bytes")
    } else if !ok(&signal.from_user) {
        Err("the sender's user id must be 1 to 255 bytes")
    } else {
        Ok(())
    }
}

/// How a hangup or reject from `side` (0 caller, 1 callee) ends a call in `phase`.
fn end_outcome(signal: &Signal, side: usize, phase: Phase) -> Outcome {
    if phase == Phase::Established {
        return Outcome::Completed;
    }
    if signal.event_type == EventType::Reject {
        return Outcome::Rejected;
    }
    let reason = signal.content.get("reason").and_then(Value::as_str);
    match (phase, side, reason) {
        (Phase::Invited, _, Some("invite_timeout")) => Outcome::Expired,
        (Phase::Invited, 1, _) => Outcome::Rejected,
        _ => Outcome::Failed,
    }
}
