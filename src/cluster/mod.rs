//! Fan-out between the instances of one deployment: Redis pub/sub, or in-process when alone.
//!
//! A [`Cluster`] publishes byte payloads on named channels and hands them to every local
//! [`Subscription`] of that channel, on every instance. With `[cluster] redis_url` set, each
//! instance holds two connections to Redis, however many subscribers it has: one multiplexed
//! connection that publishes, and one pub/sub connection carrying every channel some local
//! subscriber wants. Channel names are prefixed with `[cluster] channel_prefix`, so a Redis shared
//! with Synapse's workers is safe. Without Redis ([`Cluster::local`]) a publish reaches the
//! subscribers of this process only.
//!
//! Pub/sub is at-most-once: a message published while an instance is disconnected never reaches
//! it. So what must not be lost goes to the database first, and a message here only wakes or
//! carries the fast path. A subscriber learns that it may have missed something from
//! [`Message::Lost`]: when it fell behind (each subscription buffers [`SUBSCRIBER_CAPACITY`]
//! messages; past that they are dropped and counted), and after every reconnection to Redis.
//!
//! Connecting never blocks start-up: the future [`Cluster::connect`] returns connects in the
//! background and reconnects with a capped backoff (real time: it paces IO, not logic) until
//! shutdown. Meanwhile [`Cluster::is_up`] is false and [`Cluster::publish`] fails at once with
//! [`ClusterError::Down`], so that callers fall back (to the database poll, to Matrix).
//!
//! [`connections`] shares which users are connected to which instance, for the directory.

pub mod connections;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Messages buffered for one subscriber before it gets [`Message::Lost`] instead.
pub const SUBSCRIBER_CAPACITY: usize = 1024;
/// Backoff between attempts to reach Redis: doubling from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How long connecting, or a publish, may take before Redis counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Channels subscribed (or unsubscribed) in one command.
const SUBSCRIBE_BATCH: usize = 1000;

/// The cluster `config` describes, and the task to spawn with the others: with Redis, it connects
/// (see [`Cluster::connect`]) and shares `directory`'s connections ([`connections::share`]) until
/// `shutdown`.
pub fn start(
    config: &crate::config::Config,
    directory: &Arc<crate::directory::service::DirectoryService>,
    metrics: Arc<Metrics>,
    clock: crate::clock::Clock,
    shutdown: CancellationToken,
) -> (Cluster, futures_util::future::BoxFuture<'static, ()>) {
    let (cluster, connecting) = Cluster::from_config(config, metrics.clone(), shutdown.clone());
    let task = connecting.map(|connecting| {
        let sharing = connections::share(
            directory.clone(),
            cluster.clone(),
            connections::Settings::from_config(config),
            metrics,
            clock,
            shutdown,
        );
        async move {
            tokio::join!(connecting, sharing);
        }
    });
    // Boxed: the task is large, and `run` holds it until it is spawned.
    let task = Box::pin(async move {
        if let Some(task) = task {
            task.await;
        }
    });
    (cluster, task)
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis cannot be reached (or this instance is shutting down): nothing was published.
    #[error("the cluster's Redis is unreachable")]
    Down,
}

/// What a [`Subscription`] receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A payload published on the channel (by any instance, this one included).
    Payload(Bytes),
    /// Messages may have been missed here (the subscriber fell behind, or Redis was reconnected):
    /// resynchronise from the source of truth.
    Lost,
}

/// A handle on the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    instance: String,
    metrics: Arc<Metrics>,
    subscribers: Mutex<Subscribers>,
    next_id: AtomicU64,
    /// `None`: in-process only.
    redis: Option<RedisState>,
}

#[derive(Default)]
struct Subscribers {
    /// Set at shutdown: no more subscribers, and those left see the end of their stream.
    closed: bool,
    channels: HashMap<String, Vec<Slot>>,
}

struct Slot {
    id: u64,
    sender: mpsc::Sender<Message>,
    /// Something could not be handed over since the last message: `Lost` goes first.
    lost: bool,
}

struct RedisState {
    prefix: String,
    up: AtomicBool,
    publisher: Mutex<Option<MultiplexedConnection>>,
    /// Wakes the connection task: the wanted channels changed, or the publisher broke.
    wake: Notify,
    broken: AtomicBool,
    /// The channels subscribed in Redis at the moment (unprefixed).
    active: watch::Sender<HashSet<String>>,
}

impl Cluster {
    /// A cluster of one: publishes reach this process's subscribers only.
    pub fn local(instance: &str, metrics: Arc<Metrics>) -> Self {
        metrics.cluster.up.set(1);
        Self::new(instance, metrics, None)
    }

    /// A cluster over the Redis at `redis_url`. Nothing is connected until the returned future
    /// runs (spawn it with the other tasks): it connects, reconnects with a capped backoff while
    /// Redis is unreachable (a warning when it is lost, an info line when it is back), and returns
    /// once `shutdown` is cancelled, ending every subscription.
    pub fn connect(
        redis_url: &str,
        channel_prefix: &str,
        instance: &str,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static + use<>) {
        metrics.cluster.up.set(0);
        let redis = RedisState {
            prefix: channel_prefix.to_owned(),
            up: AtomicBool::new(false),
            publisher: Mutex::new(None),
            wake: Notify::new(),
            broken: AtomicBool::new(false),
            active: watch::Sender::new(HashSet::new()),
        };
        let cluster = Self::new(instance, metrics, Some(redis));
        let client = redis::Client::open(redis_url);
        let task = supervise(cluster.clone(), client, crate::config::redact_url(redis_url), shutdown);
        (cluster, task)
    }

    /// The cluster `config` describes: over Redis with `[cluster] redis_url` (and the task to spawn),
    /// else local; named by `[database] instance_name`.
    pub fn from_config(
        config: &crate::config::Config,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, Option<impl Future<Output = ()> + Send + 'static + use<>>) {
        let instance = &config.database.instance_name;
        match &config.cluster.redis_url {
            Some(url) => {
                let prefix = config.cluster.channel_prefix(&config.homeserver.server_name);
                let (cluster, task) = Self::connect(url.expose(), &prefix, instance, metrics, shutdown);
                (cluster, Some(task))
            }
            None => (Self::local(instance, metrics), None),
        }
    }

    fn new(instance: &str, metrics: Arc<Metrics>, redis: Option<RedisState>) -> Self {
        Self {
            inner: Arc::new(Inner {
                instance: instance.to_owned(),
                metrics,
                subscribers: Mutex::new(Subscribers::default()),
                next_id: AtomicU64::new(0),
                redis,
            }),
        }
    }

    /// This instance's name (`[database] instance_name`).
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Whether publishes can reach the other instances now (always, without Redis).
    pub fn is_up(&self) -> bool {
        self.inner.redis.as_ref().is_none_or(|redis| redis.up.load(Ordering::Acquire))
    }

    /// Publishes `payload` on `channel`. `Ok(n)`: how many received it: Redis's count of
    /// subscribed connections (one per instance subscribed to the channel, this one included), or
    /// without Redis the local subscribers. [`ClusterError::Down`] while Redis is unreachable.
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Result<usize, ClusterError> {
        let metrics = &self.inner.metrics.cluster;
        let Some(redis) = &self.inner.redis else {
            metrics.published.inc();
            return Ok(self.inner.deliver(channel, &Message::Payload(payload)));
        };
        let connection = redis.publisher.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(mut connection) = connection else {
            metrics.publish_errors.inc();
            return Err(ClusterError::Down);
        };
        let published = redis::cmd("PUBLISH")
            .arg(format!("{}{channel}", redis.prefix))
            .arg(payload.as_ref())
            .query_async::<usize>(&mut connection)
            .await;
        match published {
            Ok(receivers) => {
                metrics.published.inc();
                Ok(receivers)
            }
            Err(error) => {
                metrics.publish_errors.inc();
                tracing::debug!(%error, "cluster.publish failed");
                if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
                    // Have the connection task start over.
                    redis.broken.store(true, Ordering::Release);
                    redis.wake.notify_one();
                }
                Err(ClusterError::Down)
            }
        }
    }

    /// Messages on `channel` until the subscription is dropped. With Redis, the channel is
    /// subscribed in the background ([`Subscription::subscribed`] waits for it) and unsubscribed
    /// when its last local subscriber is dropped.
    pub fn subscribe(&self, channel: &str) -> Subscription {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_CAPACITY);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut subscribers = self.inner.lock();
            if subscribers.closed {
                // The sender is dropped here: the subscription ends at once.
                None
            } else {
                let slots = subscribers.channels.entry(channel.to_owned()).or_default();
                slots.push(Slot { id, sender, lost: false });
                Some(slots.len() == 1)
            }
        };
        if first == Some(true)
            && let Some(redis) = &self.inner.redis
        {
            redis.wake.notify_one();
        }
        Subscription { inner: self.inner.clone(), channel: channel.to_owned(), id, receiver }
    }

    /// Whether `channel` is subscribed in Redis now (always true without Redis).
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.inner.redis.as_ref().is_none_or(|redis| redis.active.borrow().contains(channel))
    }

    /// Waits until `channel` (which a local [`Subscription`] wants) is subscribed in Redis, so that
    /// what is published from then on reaches this instance; at once without Redis. While Redis is
    /// unreachable this waits for it to come back: bound it with a timeout.
    pub async fn subscribed(&self, channel: &str) {
        self.inner.subscribed(channel).await;
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `message` to every local subscriber of `channel`; returns how many.
    fn deliver(&self, channel: &str, message: &Message) -> usize {
        let mut subscribers = self.lock();
        let Some(slots) = subscribers.channels.get_mut(channel) else { return 0 };
        for slot in slots.iter_mut() {
            self.hand(slot, message.clone());
        }
        slots.len()
    }

    /// Puts `message` in `slot`'s buffer, `Lost` first if something was dropped before it.
    fn hand(&self, slot: &mut Slot, message: Message) {
        if slot.lost {
            if slot.sender.try_send(Message::Lost).is_err() {
                self.metrics.cluster.lost.inc();
                return;
            }
            slot.lost = false;
        }
        // Closed: the subscription is being dropped, and its `Drop` removes the slot.
        if let Err(mpsc::error::TrySendError::Full(_)) = slot.sender.try_send(message) {
            slot.lost = true;
            self.metrics.cluster.lost.inc();
        }
    }

    /// Every subscriber gets `Lost` (after a reconnection).
    fn lose_all(&self) {
        let mut subscribers = self.lock();
        for slot in subscribers.channels.values_mut().flatten() {
            slot.lost = true;
            if slot.sender.try_send(Message::Lost).is_ok() {
                slot.lost = false;
            }
        }
    }

    async fn subscribed(&self, channel: &str) {
        let Some(redis) = &self.redis else { return };
        let mut active = redis.active.subscribe();
        let _ = active.wait_for(|active| active.contains(channel)).await;
    }

    fn wanted(&self) -> HashSet<String> {
        self.lock().channels.keys().cloned().collect()
    }
}

/// Messages of one channel; see [`Cluster::subscribe`].
pub struct Subscription {
    inner: Arc<Inner>,
    channel: String,
    id: u64,
    receiver: mpsc::Receiver<Message>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message; `None` once the cluster has shut down. Cancel-safe.
    pub async fn next(&mut self) -> Option<Message> {
        self.receiver.recv().await
    }

    /// Waits until the channel is subscribed in Redis; see [`Cluster::subscribed`].
    pub async fn subscribed(&self) {
        self.inner.subscribed(&self.channel).await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let last = {
            let mut subscribers = self.inner.lock();
            let Some(slots) = subscribers.channels.get_mut(&self.channel) else { return };
            slots.retain(|slot| slot.id != self.id);
            let last = slots.is_empty();
            if last {
                subscribers.channels.remove(&self.channel);
            }
            last
        };
        if last && let Some(redis) = &self.inner.redis {
            redis.wake.notify_one();
        }
    }
}

/// The connection task of [`Cluster::connect`].
async fn supervise(
    cluster: Cluster,
    client: redis::RedisResult<redis::Client>,
    shown_url: String,
    shutdown: CancellationToken,
) {
    let inner = &cluster.inner;
    let redis = inner.redis.as_ref().expect("a Redis cluster");
    let metrics = &inner.metrics.cluster;
    match client {
        Ok(client) => {
            let mut backoff = BACKOFF.0;
            let mut connected_before = false;
            let mut warned = false;
            while !shutdown.is_cancelled() {
                let connected = tokio::select! {
                    () = shutdown.cancelled() => break,
                    connected = connect(&client) => connected,
                };
                let (publisher, sink, stream) = match connected {
                    Ok(connected) => connected,
                    Err(error) => {
                        if !warned {
                            tracing::warn!(%error, redis = %shown_url, "cluster: cannot reach Redis; retrying (fan-out between instances is off)");
                            warned = true;
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF.1);
                        continue;
                    }
                };
                backoff = BACKOFF.0;
                redis.broken.store(false, Ordering::Release);
                *redis.publisher.lock().unwrap_or_else(PoisonError::into_inner) = Some(publisher);
                redis.up.store(true, Ordering::Release);
                metrics.up.set(1);
                if connected_before {
                    metrics.reconnects.inc();
                    tracing::info!(instance = %inner.instance, "cluster: Redis is back");
                    // Whatever was published meanwhile is gone.
                    inner.lose_all();
                } else {
                    tracing::info!(instance = %inner.instance, redis = %shown_url, "cluster: connected to Redis");
                }
                connected_before = true;
                warned = false;
                let error = relay(inner, redis, sink, stream, &shutdown).await;
                if shutdown.is_cancelled() {
                    // The publisher stays, so that last words (an instance saying it is gone)
                    // still go out while the other tasks stop.
                    break;
                }
                redis.up.store(false, Ordering::Release);
                *redis.publisher.lock().unwrap_or_else(PoisonError::into_inner) = None;
                redis.active.send_modify(HashSet::clear);
                metrics.up.set(0);
                metrics.channels.set(0);
                if let Some(error) = error {
                    tracing::warn!(%error, redis = %shown_url, "cluster: lost Redis; reconnecting (fan-out between instances is off)");
                    warned = true;
                }
            }
        }
        Err(error) => {
            // Validation checked the scheme; whatever else is wrong is said once, here.
            tracing::error!(%error, "cluster: redis_url cannot be used; fan-out between instances is off");
            shutdown.cancelled().await;
        }
    }
    redis.up.store(false, Ordering::Release);
    metrics.up.set(0);
    let mut subscribers = inner.lock();
    subscribers.closed = true;
    // Dropping the senders ends every subscription.
    subscribers.channels.clear();
}

type Connected = (MultiplexedConnection, PubSubSink, PubSubStream);

async fn connect(client: &redis::Client) -> redis::RedisResult<Connected> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let publisher = client.get_multiplexed_async_connection_with_config(&config).await?;
    let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    let (sink, stream) = pubsub.split();
    Ok((publisher, sink, stream))
}

/// Keeps Redis subscribed to the wanted channels and hands each message to its subscribers, until
/// the connection is lost (the error, if one was seen) or `shutdown`.
async fn relay(
    inner: &Inner,
    redis: &RedisState,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    shutdown: &CancellationToken,
) -> Option<redis::RedisError> {
    let metrics = &inner.metrics.cluster;
    loop {
        if redis.broken.load(Ordering::Acquire) {
            return Some(redis::RedisError::from(std::io::Error::other("a publish failed")));
        }
        let wanted = inner.wanted();
        let active = redis.active.borrow().clone();
        // In batches: after a reconnection every wanted channel is subscribed again.
        let missing: Vec<&String> = wanted.difference(&active).collect();
        for batch in missing.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> =
                batch.iter().map(|channel| format!("{}{channel}", redis.prefix)).collect();
            if let Err(error) = sink.subscribe(&names).await {
                return Some(error);
            }
            redis.active.send_modify(|active| active.extend(batch.iter().map(|channel| (*channel).clone())));
        }
        let unwanted: Vec<&String> = active.difference(&wanted).collect();
        for batch in unwanted.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> =
                batch.iter().map(|channel| format!("{}{channel}", redis.prefix)).collect();
            if let Err(error) = sink.unsubscribe(&names).await {
                return Some(error);
            }
            redis.active.send_modify(|active| {
                for channel in batch {
                    active.remove(*channel);
                }
            });
        }
        metrics.channels.set(i64::try_from(redis.active.borrow().len()).unwrap_or(i64::MAX));
        tokio::select! {
            () = shutdown.cancelled() => return None,
            // The wanted channels changed (or a publish broke): look again.
            () = redis.wake.notified() => {}
            message = stream.next() => {
                let Some(message) = message else {
                    return Some(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
                };
                metrics.received.inc();
                if let Some(channel) = message.get_channel_name().strip_prefix(redis.prefix.as_str()) {
                    let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                    inner.deliver(channel, &Message::Payload(payload));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_cluster_hands_a_payload_to_each_subscriber_of_its_channel() {
        let cluster = Cluster::local("main", Arc::new(Metrics::new()));
        let mut first = cluster.subscribe("a");
        let mut second = cluster.subscribe("a");
        let _other = cluster.subscribe("b");
        first.subscribed().await;
        assert_eq!(cluster.publish("a", Bytes::from_static(b"hi")).await.unwrap(), 2);
        assert_eq!(first.next().await, Some(Message::Payload(Bytes::from_static(b"hi"))));
        assert_eq!(second.next().await, Some(Message::Payload(Bytes::from_static(b"hi"))));
        drop(second);
        assert_eq!(cluster.publish("a", Bytes::new()).await.unwrap(), 1);
        drop(first);
        assert_eq!(cluster.publish("a", Bytes::new()).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_lost_and_memory_stays_bounded() {
        let metrics = Arc::new(Metrics::new());
        let cluster = Cluster::local("main", metrics.clone());
        let mut slow = cluster.subscribe("a");
        let total = SUBSCRIBER_CAPACITY + 100;
        for i in 0..total {
            cluster.publish("a", Bytes::from(i.to_string())).await.unwrap();
        }
        assert_eq!(metrics.cluster.lost.get(), 100);
        for i in 0..SUBSCRIBER_CAPACITY {
            assert_eq!(slow.next().await, Some(Message::Payload(Bytes::from(i.to_string()))));
        }
        // The buffer has room again: the gap is marked before what comes next.
        cluster.publish("a", Bytes::from_static(b"after")).await.unwrap();
        assert_eq!(slow.next().await, Some(Message::Lost));
        assert_eq!(slow.next().await, Some(Message::Payload(Bytes::from_static(b"after"))));
    }
}
