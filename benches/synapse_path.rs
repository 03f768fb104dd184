//! End-to-end latency through a real Synapse: a client sends a to-device message (how Raiden signals)
//! to a user in an appservice's namespace; how long until the appservice has it?
//!
//! Side by side in one run, registered with the same Synapse:
//! - Switchboard (in this process, SQLite): "has it" = the item is committed to its store;
//! - a null appservice (in this process): "has it" = the transaction carrying it arrived.
//!
//! Messages alternate between the two targets. Run: `cargo bench --bench synapse_path`
//! (needs the Synapse venv: `deploy/synapse/install`). `SWITCHBOARD_BENCH_MESSAGES` (default 200).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::{post, put};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use switchboard::store::{ItemKind, Store};
use tokio::sync::mpsc;

const NULL_AS_TOKEN: &str = "null-as-token-nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn";
const NULL_HS_TOKEN: &str = "null-hs-token-nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn";

/// Longest wait for one message before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(10);

/// The null appservice: answers every request `{}` at once (with `TCP_NODELAY`, like Switchboard)
/// and reports the bodies of to-device messages it receives.
async fn null_appservice(arrived: mpsc::UnboundedSender<String>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = move |body: Bytes| {
        let arrived = arrived.clone();
        async move {
            if let Ok(txn) = serde_json::from_slice::<Value>(&body) {
                for message in txn["de.sorunome.msc2409.to_device"].as_array().into_iter().flatten() {
                    if let Some(body) = message["content"]["body"].as_str() {
                        let _ = arrived.send(body.to_owned());
                    }
                }
            }
            axum::Json(json!({}))
        }
    };
    let router = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(handler))
        .route("/_matrix/app/v1/ping", post(|| async { axum::Json(json!({})) }));
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// The `p`th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() - 1) * p / 100]
}

#[tokio::main]
async fn main() {
    let messages: usize =
        std::env::var("SWITCHBOARD_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());

    // Switchboard's listeners first, so its registration can name its URL.
    let mut config = common::config(&db, "http://127.0.0.1:9");
    let listeners = common::bind(&config).await;
    config.appservice.url = format!("http://{}", listeners.appservice.local_addr().unwrap()).parse().unwrap();
    let switchboard_registration = dir.path().join("switchboard.yaml");
    std::fs::write(&switchboard_registration, switchboard::appservice::registration::render(&config))
        .unwrap();

    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let null_addr = null_appservice(arrived_tx).await;
    let null_registration = dir.path().join("null.yaml");
    std::fs::write(
        &null_registration,
        format!(
            "id: 'null'\nurl: 'http://{null_addr}'\nas_token: '{NULL_AS_TOKEN}'\nhs_token: '{NULL_HS_TOKEN}'\n\
             sender_localpart: 'nullbot'\nrate_limited: false\nnamespaces:\n  users:\n    - exclusive: false\n\
             \x20     regex: '@null_.*:localhost'\n  rooms: []\n  aliases: []\nreceive_ephemeral: true\n\
             de.sorunome.msc2409.push_ephemeral: true\n"
        ),
    )
    .unwrap();

    let Some(synapse) = common::Synapse::start(&[&switchboard_registration, &null_registration]).await else {
        eprintln!("no Synapse venv: run deploy/synapse/install");
        return;
    };
    config.homeserver.url = synapse.base_url.parse().unwrap();
    let running = common::start_on(config, listeners);
    running.wait_listening().await;

    let alice = synapse.register("alice").await;
    let raiden = synapse.register(&common::raiden_localpart()).await;
    let null_user = synapse.register("null_peer").await;
    let store = Arc::new(Store::connect(&db, 1).await.unwrap());

    let mut latencies: [Vec<f64>; 2] = [Vec::new(), Vec::new()]; // [switchboard, null]
    let mut last_id = 0;
    for n in 0..messages + 10 {
        let to_switchboard = n % 2 == 0;
        let target = if to_switchboard { &raiden } else { &null_user };
        let body = format!("signal {n}");
        let content = json!({ "messages": { &target.user_id: { &target.device_id: { "msgtype": "m.notice", "body": body } } } });
        let path = format!("/_matrix/client/v3/sendToDevice/m.room.message/bench{n}");
        let started = Instant::now();
        synapse.call(&alice, reqwest::Method::PUT, &path, &content).await;
        let deadline = started + DEADLINE;
        if to_switchboard {
            'wait: loop {
                for item in store.items_after(last_id, 100).await.unwrap() {
                    last_id = item.id;
                    if item.kind == ItemKind::ToDevice && item.body.get().contains(&format!("\"{body}\"")) {
                        break 'wait;
                    }
                }
                assert!(Instant::now() < deadline, "{body} did not reach Switchboard");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        } else {
            loop {
                let got = tokio::time::timeout_at(deadline.into(), arrived.recv()).await;
                if got.expect("the null appservice gets the message").as_deref() == Some(body.as_str()) {
                    break;
                }
            }
        }
        // The first messages warm up both paths and are not counted.
        if n >= 10 {
            latencies[usize::from(!to_switchboard)].push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    running.stop().await.unwrap();

    println!(
        "\n{messages} to-device messages through Synapse, alternating targets; ms from send to arrival\n"
    );
    println!("| appservice | messages | p50 ms | p90 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    let mut p50 = [0.0; 2];
    for (i, name) in ["Switchboard (stored, SQLite)", "null appservice (received)"].iter().enumerate() {
        let sorted = &mut latencies[i];
        sorted.sort_by(f64::total_cmp);
        p50[i] = percentile(sorted, 50);
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            sorted.len(),
            p50[i],
            percentile(sorted, 90),
            percentile(sorted, 99)
        );
    }
    println!("\np50 ratio Switchboard / null appservice: {:.2}", p50[0] / p50[1]);
}
