//! `switchboard peer`: a command-line peer that an operator runs twice to check a deployment end to
//! end ("can two users upgrade through my relay, and how fast?").
//!
//! - `--listen` answers every message it receives with the same bytes (echo), until `--count`
//!   messages were echoed (when given) or `--timeout` passes.
//! - `--to ADDRESS` opens a data channel to that address and, once it is up, sends `--count`
//!   Raiden-shaped JSON messages padded to `--size` bytes, one at a time: a message is acknowledged
//!   when its echo comes back, and its round-trip time is the time to that echo.
//!
//! Both print the path in use (`direct`, `relay`, or `matrix` when no channel is up), the upgrade
//! time (`open` → channel up) and the round-trip times, and with `--json` end with one JSON line
//! ([`Report`]). The sender fails with a clear reason when no channel comes up within the timeout,
//! or when echoes are missing at the end.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

use super::rtc::Path;
use super::{Client, ClientConfig, ClientError, ClientEvent, ClientEvents};

/// What the peer does.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Echo what peers send.
    Listen,
    /// Open a channel to this address and send.
    To(String),
}

/// `switchboard peer`'s options (see the module doc).
#[derive(Debug, Clone)]
pub struct PeerOptions {
    pub mode: Mode,
    /// Messages to send (`--to`), or to echo before stopping (`--listen`; 0: until the timeout).
    pub count: usize,
    /// Bytes per message (`--to`).
    pub size: usize,
    /// How long the whole run may take (`--listen`: how long to listen; zero: until interrupted).
    pub timeout: Duration,
}

/// The run's figures; `--json` prints them as one line.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    /// `direct`, `relay`, or `matrix` (no data channel up at the end).
    pub path: &'static str,
    /// From `open` to the channel being up (`--to`); `null` when it never came up.
    pub upgrade_ms: Option<f64>,
    pub rtt_ms: Rtt,
    pub sent: usize,
    pub acknowledged: usize,
    pub received: usize,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Rtt {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "no data channel to {address} within {waited:?}: check that the peer runs `switchboard peer --listen`, \
         that Switchboard is reachable ({switchboard}), and that TURN works (the relay's logs and metrics)"
    )]
    NoUpgrade { address: String, waited: Duration, switchboard: &'static str },
    #[error("{acknowledged} of {sent} messages acknowledged (echoed) within the timeout")]
    Unacknowledged { sent: usize, acknowledged: usize },
    #[error("the client stopped: {0}")]
    Stopped(String),
}

fn path_name(path: Option<Path>) -> &'static str {
    match path {
        Some(Path::Relay) => "relay",
        Some(Path::Direct) => "direct",
        None => "matrix",
    }
}

/// A Raiden-shaped message (a LockedTransfer's fields) padded to `size` bytes of JSON text.
pub fn message(index: usize, size: usize) -> Bytes {
    let head = json!({
        "type": "LockedTransfer", "message_identifier": index.to_string(), "chain_id": "1",
        "nonce": "1", "transferred_amount": "0", "locked_amount": "1000000000000000",
    })
    .to_string();
    // `{…,"padding":"xxx"}`: the head without its closing brace, the padding field, a brace.
    let fixed = head.len() - 1 + ",\"padding\":\"\"}".len();
    let padding = "x".repeat(size.saturating_sub(fixed));
    Bytes::from(format!("{},\"padding\":\"{padding}\"}}", &head[..head.len() - 1]))
}

/// The index of a message made by [`message`].
fn index_of(bytes: &[u8]) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value["message_identifier"].as_str()?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let at = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    Some(sorted[at])
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Connects with `config` and runs `options`; `say` gets one human line per step. On failure the
/// report so far comes with the error.
pub async fn run(
    config: ClientConfig,
    options: &PeerOptions,
    mut say: impl FnMut(&str),
) -> Result<Report, (PeerError, Report)> {
    let switchboard = if config.switchboard.is_some() { "given" } else { "discovered from the well-known" };
    let (client, mut events) =
        Client::connect(config).await.map_err(|error| (error.into(), Report::default()))?;
    say(&format!("connected as {}", client.user_id()));
    let deadline = (!options.timeout.is_zero()).then(|| Instant::now() + options.timeout);
    let result = match &options.mode {
        Mode::Listen => listen(&client, &mut events, options, deadline, &mut say).await,
        Mode::To(address) => {
            send_to(&client, &mut events, address, options, deadline, switchboard, &mut say).await
        }
    };
    client.shutdown().await;
    result
}

/// The next event before `deadline` (`None` once it passed or the client stopped).
async fn next_event(events: &mut ClientEvents, deadline: Option<Instant>) -> Option<ClientEvent> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), events.next()).await.ok().flatten(),
        None => events.next().await,
    }
}

async fn listen(
    client: &Client,
    events: &mut ClientEvents,
    options: &PeerOptions,
    deadline: Option<Instant>,
    say: &mut impl FnMut(&str),
) -> Result<Report, (PeerError, Report)> {
    let mut report = Report { path: "matrix", ..Report::default() };
    let mut peers = std::collections::BTreeSet::new();
    say("listening; every message is echoed to its sender");
    while options.count == 0 || report.sent < options.count {
        let Some(event) = next_event(events, deadline).await else { break };
        match event {
            ClientEvent::ChannelUp { address, path } => {
                report.path = path_name(Some(path));
                say(&format!("channel up with {address}: {}", report.path));
            }
            ClientEvent::ChannelDown { address, reason } => {
                report.path = "matrix";
                say(&format!("channel down with {address}: {reason}"));
            }
            ClientEvent::Message { address, bytes } => {
                report.received += 1;
                if let Err(error) = client.send(&address, bytes).await {
                    return Err((error.into(), report));
                }
                report.sent += 1;
                peers.insert(address);
            }
            ClientEvent::SyncStopped { reason } => return Err((PeerError::Stopped(reason), report)),
            ClientEvent::Switchboard { connected } => {
                say(if connected { "Switchboard connected" } else { "Switchboard not connected" });
            }
            ClientEvent::Presence(_) => {}
        }
    }
    say(&format!("echoed {} messages", report.sent));
    // A sent echo is only in the replay buffer: let the peers acknowledge them before stopping
    // (which would drop them), for at most `DRAIN` (a peer that stopped first never will).
    let drained = Instant::now() + DRAIN;
    for address in &peers {
        while Instant::now() < drained {
            match client.stats(address).await {
                Ok(Some(stats)) if stats.counters.replay_buffered_fragments > 0 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => break,
            }
        }
    }
    Ok(report)
}

/// How long a listener waits for its last echoes to be acknowledged before it stops.
const DRAIN: Duration = Duration::from_secs(3);

async fn send_to(
    client: &Client,
    events: &mut ClientEvents,
    address: &str,
    options: &PeerOptions,
    deadline: Option<Instant>,
    switchboard: &'static str,
    say: &mut impl FnMut(&str),
) -> Result<Report, (PeerError, Report)> {
    let mut report = Report { path: "matrix", ..Report::default() };
    let opened = Instant::now();
    if let Err(error) = client.open(address).await {
        return Err((error.into(), report));
    }
    say(&format!("calling {address}"));
    // The upgrade first: this command exists to check it. It is timed from the call, which
    // starts once Switchboard is connected (after the client's first /sync), not from `open`.
    let mut called = opened;
    let mut path = None;
    while path.is_none() {
        match next_event(events, deadline).await {
            Some(ClientEvent::ChannelUp { path: up, .. }) => path = Some(up),
            Some(ClientEvent::SyncStopped { reason }) => return Err((PeerError::Stopped(reason), report)),
            Some(ClientEvent::Switchboard { connected }) => {
                if connected {
                    called = Instant::now();
                }
                say(if connected { "Switchboard connected" } else { "Switchboard not connected" });
            }
            Some(_) => {}
            None => {
                let error = PeerError::NoUpgrade {
                    address: address.to_owned(),
                    waited: opened.elapsed(),
                    switchboard,
                };
                return Err((error, report));
            }
        }
    }
    let upgrade = called.elapsed();
    report.path = path_name(path);
    report.upgrade_ms = Some(millis(upgrade));
    say(&format!("channel up: {} in {:.1} ms", report.path, millis(upgrade)));

    // Then the messages, one at a time; each waits for its echo.
    let mut rtts = Vec::with_capacity(options.count);
    'messages: for index in 0..options.count {
        let started = Instant::now();
        if let Err(error) = client.send(address, message(index, options.size)).await {
            return Err((error.into(), report));
        }
        report.sent += 1;
        loop {
            match next_event(events, deadline).await {
                Some(ClientEvent::Message { bytes, .. }) => {
                    report.received += 1;
                    if index_of(&bytes) == Some(index) {
                        report.acknowledged += 1;
                        rtts.push(millis(started.elapsed()));
                        break;
                    }
                }
                Some(ClientEvent::ChannelDown { reason, .. }) => {
                    report.path = "matrix";
                    say(&format!("channel down: {reason}; the rest goes through Matrix"));
                }
                Some(ClientEvent::ChannelUp { path, .. }) => report.path = path_name(Some(path)),
                Some(ClientEvent::SyncStopped { reason }) => {
                    return Err((PeerError::Stopped(reason), report));
                }
                Some(_) => {}
                None => break 'messages,
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    report.rtt_ms = Rtt { p50: percentile(&rtts, 50.0), p99: percentile(&rtts, 99.0) };
    if let (Some(p50), Some(p99)) = (report.rtt_ms.p50, report.rtt_ms.p99) {
        say(&format!(
            "{} messages of {} bytes: round trip p50 {p50:.2} ms, p99 {p99:.2} ms ({})",
            report.acknowledged, options.size, report.path
        ));
    }
    if report.acknowledged < report.sent || report.sent < options.count {
        let error = PeerError::Unacknowledged { sent: options.count, acknowledged: report.acknowledged };
        return Err((error, report));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_raiden_shaped_json_of_the_asked_size() {
        for size in [985, 3_200, 20_000] {
            let bytes = message(7, size);
            assert_eq!(bytes.len(), size);
            assert_eq!(index_of(&bytes), Some(7));
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value["type"], "LockedTransfer");
        }
        // Smaller than the fields themselves: the fields, unpadded.
        assert_eq!(index_of(&message(3, 10)), Some(3));
    }

    #[test]
    fn the_report_is_the_documented_json_line() {
        let report = Report {
            path: "relay",
            upgrade_ms: Some(12.5),
            rtt_ms: Rtt { p50: Some(0.5), p99: Some(1.5) },
            sent: 2,
            acknowledged: 2,
            received: 2,
        };
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            json!({ "path": "relay", "upgrade_ms": 12.5, "rtt_ms": { "p50": 0.5, "p99": 1.5 },
                    "sent": 2, "acknowledged": 2, "received": 2 })
        );
    }
}
