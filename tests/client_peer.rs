//! `switchboard peer`, run twice as an operator would, against the real stack (Synapse and
//! Switchboard with its embedded TURN relay): `--listen` on one Raiden user, `--to <its address>` on
//! another, relay-only. The sender's JSON line says the channel went through the relay and every
//! message came back; a sender with nobody listening fails with a clear reason.

mod common;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
const COUNT: usize = 20;

fn peer(homeserver: &str, switchboard: &str, token_file: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["peer", "--homeserver", homeserver, "--switchboard", switchboard, "--relay-only"])
        .arg("--access-token-file")
        .arg(token_file)
        .args(args)
        .env_remove("SWITCHBOARD_PEER_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn two_peers_upgrade_through_the_relay_and_every_message_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let switchboard = format!("http://{}", running.client);
    let token_file = |name: &str, token: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path
    };
    let (alice_token, bob_token) = (
        token_file("alice.token", &alice.user.access_token),
        token_file("bob.token", &bob.user.access_token),
    );

    // Bob listens; once Switchboard has him, Alice's invite takes the relay.
    let count = COUNT.to_string();
    let mut bob_peer =
        peer(&synapse.base_url, &switchboard, &bob_token, &["--listen", "--count", &count, "--json"])
            .spawn()
            .unwrap();
    let mut listener_log = BufReader::new(bob_peer.stderr.take().unwrap()).lines();
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = listener_log.next_line().await.unwrap() {
            if line.contains("Switchboard connected") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(connected, Ok(true), "the listener connects to Switchboard");

    let sender = peer(
        &synapse.base_url,
        &switchboard,
        &alice_token,
        &["--to", &bob.address, "--count", &count, "--size", "3200", "--timeout", "60", "--json"],
    )
    .output();
    let sender =
        tokio::time::timeout(Duration::from_secs(90), sender).await.expect("the sender ends").unwrap();
    let stderr = String::from_utf8_lossy(&sender.stderr);
    assert!(sender.status.success(), "{}\n{stderr}", sender.status);
    let stdout = String::from_utf8_lossy(&sender.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    println!("sender: {report}\n{stderr}");
    assert_eq!(report["path"], "relay", "{report}");
    assert_eq!((report["sent"].as_u64(), report["acknowledged"].as_u64()), (Some(20), Some(20)));
    assert_eq!(report["received"], 20);
    assert!(report["upgrade_ms"].as_f64().unwrap() > 0.0);
    assert!(report["rtt_ms"]["p50"].as_f64().unwrap() <= report["rtt_ms"]["p99"].as_f64().unwrap());
    assert!(stderr.contains("channel up: relay"), "{stderr}");

    // The listener echoed all of them and exits by itself.
    let exit =
        tokio::time::timeout(Duration::from_secs(30), bob_peer.wait()).await.expect("the listener ends");
    assert!(exit.unwrap().success());
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut bob_peer.stdout.take().unwrap(), &mut out).await.unwrap();
    let listened: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (listened["received"].as_u64(), listened["sent"].as_u64()),
        (Some(20), Some(20)),
        "{listened}"
    );

    // Nobody listening at Bob's address any more: a clear reason and a failing exit code.
    let lonely = peer(
        &synapse.base_url,
        &switchboard,
        &alice_token,
        &["--to", &bob.address, "--count", "1", "--timeout", "5", "--json"],
    )
    .output();
    let lonely =
        tokio::time::timeout(Duration::from_secs(30), lonely).await.expect("the sender gives up").unwrap();
    assert!(!lonely.status.success());
    let stderr = String::from_utf8_lossy(&lonely.stderr);
    assert!(stderr.contains("no data channel to"), "{stderr}");
    let report: Value =
        serde_json::from_str(String::from_utf8_lossy(&lonely.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(report["path"], "matrix");
    assert_eq!(report["upgrade_ms"], Value::Null);
    running.stop().await.unwrap();
}
