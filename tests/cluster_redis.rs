//! Fan-out between instances through a real redis-server: two `Cluster`s on one Redis, what
//! publishing reaches, and what happens when Redis goes away and comes back.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use switchboard::cluster::{Cluster, ClusterError, Message, Subscription};
use switchboard::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "switchboard.test.";
const WAIT: Duration = Duration::from_secs(10);

struct Instance {
    cluster: Cluster,
    metrics: Arc<Metrics>,
}

fn instance(redis: &common::Redis, name: &str, shutdown: &CancellationToken) -> Instance {
    let metrics = Arc::new(Metrics::new());
    let (cluster, task) = Cluster::connect(&redis.url(), PREFIX, name, metrics.clone(), shutdown.clone());
    tokio::spawn(task);
    Instance { cluster, metrics }
}

async fn next(subscription: &mut Subscription) -> Message {
    tokio::time::timeout(WAIT, subscription.next()).await.expect("a message within 10 s").expect("not closed")
}

async fn subscribed(subscription: &Subscription) {
    tokio::time::timeout(WAIT, subscription.subscribed()).await.expect("subscribed in Redis within 10 s");
}

fn metric(instance: &Instance, name: &str) -> u64 {
    common::metric(&instance.metrics.render(), name)
}

#[tokio::test]
async fn a_publish_reaches_every_instance_subscribed_to_its_channel_and_says_how_many() {
    let Some(redis) = common::Redis::start().await else { return };
    let shutdown = CancellationToken::new();
    let (a, b) = (instance(&redis, "a", &shutdown), instance(&redis, "b", &shutdown));
    let mut on_a = a.cluster.subscribe("calls");
    let mut on_b = b.cluster.subscribe("calls");
    let mut also_on_b = b.cluster.subscribe("calls");
    let elsewhere = b.cluster.subscribe("other");
    for subscription in [&on_a, &on_b, &also_on_b, &elsewhere] {
        subscribed(subscription).await;
    }
    assert!(a.cluster.is_up() && b.cluster.is_up());

    // One connection per instance: Redis counts two receivers, though b has two subscribers.
    let payload = Bytes::from_static(b"{\"offer\":1}");
    assert_eq!(a.cluster.publish("calls", payload.clone()).await.unwrap(), 2);
    for subscription in [&mut on_a, &mut on_b, &mut also_on_b] {
        assert_eq!(next(subscription).await, Message::Payload(payload.clone()));
    }
    assert_eq!(a.cluster.publish("nobody", Bytes::new()).await.unwrap(), 0);

    // Once b's last subscriber of the channel is gone, b leaves it in Redis.
    drop((on_b, also_on_b));
    common::eventually(WAIT, "b to unsubscribe", || async {
        (a.cluster.publish("calls", Bytes::new()).await.unwrap() == 1).then_some(())
    })
    .await;
    assert_eq!(metric(&b, "switchboard_cluster_channels "), 1, "only `other` is left");
    shutdown.cancel();
    // What a received meanwhile (its own publishes), then the end: shutdown ends subscriptions.
    let ended = tokio::time::timeout(WAIT, async { while on_a.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "a's subscription ends at shutdown");
}

/// Log lines of this test (the runtime is single-threaded, so a thread-local subscriber sees every
/// task's).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn losing_redis_is_reported_and_subscriptions_come_back_with_it() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let Some(mut redis) = common::Redis::start().await else { return };
    let shutdown = CancellationToken::new();
    let (a, b) = (instance(&redis, "a", &shutdown), instance(&redis, "b", &shutdown));
    let mut on_b = b.cluster.subscribe("inbox");
    // More channels than one SUBSCRIBE carries: all come back after the reconnection.
    let many: Vec<Subscription> = (0..1500).map(|i| b.cluster.subscribe(&format!("user.{i}"))).collect();
    subscribed(&on_b).await;
    subscribed(many.last().unwrap()).await;
    common::eventually(WAIT, "a connected", || async { a.cluster.is_up().then_some(()) }).await;
    assert_eq!(metric(&a, "switchboard_cluster_up "), 1);

    redis.stop();
    common::eventually(WAIT, "both to see Redis gone", || async {
        (!a.cluster.is_up() && !b.cluster.is_up()).then_some(())
    })
    .await;
    assert!(matches!(a.cluster.publish("inbox", Bytes::new()).await, Err(ClusterError::Down)));
    assert_eq!(metric(&a, "switchboard_cluster_up "), 0);
    assert!(metric(&a, "switchboard_cluster_publish_errors_total") >= 1);
    let text = logs.text();
    assert!(text.contains("WARN") && text.contains("cluster: lost Redis"), "{text}");

    redis.restart().await;
    subscribed(&on_b).await;
    // The subscriber is told it may have missed messages, then gets what is published again.
    assert_eq!(next(&mut on_b).await, Message::Lost);
    common::eventually(WAIT, "a back", || async { a.cluster.is_up().then_some(()) }).await;
    assert_eq!(a.cluster.publish("inbox", Bytes::from_static(b"again")).await.unwrap(), 1);
    assert_eq!(next(&mut on_b).await, Message::Payload(Bytes::from_static(b"again")));
    assert_eq!(metric(&a, "switchboard_cluster_up "), 1);
    assert_eq!(metric(&b, "switchboard_cluster_reconnects_total"), 1);
    for subscription in [&many[0], &many[1499]] {
        subscribed(subscription).await;
    }
    assert_eq!(metric(&b, "switchboard_cluster_channels "), 1501);
    assert_eq!(a.cluster.publish("user.1499", Bytes::new()).await.unwrap(), 1);
    assert!(logs.text().contains("cluster: Redis is back"));
    shutdown.cancel();
}

#[tokio::test]
async fn an_instance_started_before_redis_connects_once_it_is_there() {
    let Some(mut redis) = common::Redis::start().await else { return };
    redis.stop();
    let shutdown = CancellationToken::new();
    let a = instance(&redis, "a", &shutdown);
    let mut on_a = a.cluster.subscribe("x");
    assert!(!a.cluster.is_up());
    assert!(matches!(a.cluster.publish("x", Bytes::new()).await, Err(ClusterError::Down)));
    redis.restart().await;
    subscribed(&on_a).await;
    assert_eq!(a.cluster.publish("x", Bytes::from_static(b"1")).await.unwrap(), 1);
    assert_eq!(next(&mut on_a).await, Message::Payload(Bytes::from_static(b"1")));
    assert_eq!(metric(&a, "switchboard_cluster_reconnects_total"), 0, "a first connection");
    shutdown.cancel();
}
