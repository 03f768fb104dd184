//! Logs (tracing to stderr, text or JSON) and Prometheus metrics.
//!
//! Secrets never reach a log line: tokens are held in [`crate::config::Secret`], whose `Debug` is
//! redacted, and no span or event records a token, a request's query string or an `Authorization`
//! header (a test captures the logs of a whole run and checks this).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::store::ItemKind;

/// Installs the global subscriber writing to stderr (ANSI colours only on a terminal). `RUST_LOG`,
/// when set, overrides `log.level`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    // A second initialisation keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: ItemKind,
}

/// Why a request to the appservice API was refused.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Rejection {
    MissingToken,
    WrongToken,
    InvalidParam,
    TooLarge,
    NotJson,
    BadJson,
    Database,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::MissingToken => "missing_token",
            Rejection::WrongToken => "wrong_token",
            Rejection::InvalidParam => "invalid_param",
            Rejection::TooLarge => "too_large",
            Rejection::NotJson => "not_json",
            Rejection::BadJson => "bad_json",
            Rejection::Database => "database",
        }
    }
}

impl EncodeLabelValue for Rejection {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: Rejection,
}

/// A directory request to the homeserver: `kind` is `profile` or `presence`, `outcome` is `found`,
/// `absent` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayedLabel {
    pub transport: &'static str,
    /// `to_peer` or `to_client`.
    pub direction: &'static str,
}

/// One of the bounded tables: the directory's `watched` (addresses clients asked for) and
/// `looked_up` (users whose profile was asked of the homeserver recently), or the signalling
/// service's memories.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

/// The directory's bounds and the work it saves (see docs/operations.md).
#[derive(Default)]
pub struct DirectoryMetrics {
    /// Users of other homeservers the directory holds (`[directory] max_remote_users`).
    pub remote_users: Gauge,
    /// Remote users evicted, the ones seen longest ago first.
    pub remote_evicted: Counter,
    /// Entries of each bounded table.
    pub table_entries: Family<TableLabel, Gauge>,
    /// Entries evicted from a full table, the oldest first (expired ones are not counted).
    pub table_evicted: Family<TableLabel, Counter>,
    /// Displayname signatures recovered (secp256k1), only for new or changed displaynames.
    pub signature_checks: Counter,
}

impl DirectoryMetrics {
    fn register(&self, registry: &mut Registry) {
        let directory = registry.sub_registry_with_prefix("directory");
        directory.register(
            "remote_users",
            "Users of other homeservers the directory holds",
            self.remote_users.clone(),
        );
        directory.register(
            "remote_users_evicted",
            "Users of other homeservers evicted past max_remote_users, seen longest ago first",
            self.remote_evicted.clone(),
        );
        directory.register(
            "table_entries",
            "Entries of the directory's bounded tables",
            self.table_entries.clone(),
        );
        directory.register(
            "table_evicted",
            "Entries evicted from a full directory table, oldest first",
            self.table_evicted.clone(),
        );
        directory.register(
            "signature_checks",
            "Displayname signatures recovered (new or changed displaynames only)",
            self.signature_checks.clone(),
        );
    }
}

/// The embedded TURN relay's metrics, by client transport.
#[derive(Default)]
pub struct TurnMetrics {
    pub allocations: Family<TransportLabel, Gauge>,
    pub permissions: Family<TransportLabel, Gauge>,
    pub channels: Family<TransportLabel, Gauge>,
    pub relayed_packets: Family<RelayedLabel, Counter>,
    pub relayed_bytes: Family<RelayedLabel, Counter>,
    pub auth_failures: Family<TransportLabel, Counter>,
    pub denied_peers: Family<TransportLabel, Counter>,
    pub quota_refusals: Family<TransportLabel, Counter>,
    pub rate_limited: Family<TransportLabel, Counter>,
    pub amplification_dropped: Family<TransportLabel, Counter>,
    pub over_bandwidth_dropped: Family<TransportLabel, Counter>,
    pub unpermitted_dropped: Family<TransportLabel, Counter>,
    pub connections: Family<TransportLabel, Gauge>,
    pub connections_refused: Family<TransportLabel, Counter>,
    pub shard_ticks: Family<ShardLabel, Counter>,
    pub permission_refusals: Family<TransportLabel, Counter>,
    pub channel_refusals: Family<TransportLabel, Counter>,
    pub allocate_timeouts: Family<TransportLabel, Counter>,
}

impl TurnMetrics {
    fn register(&self, registry: &mut Registry) {
        let turn = registry.sub_registry_with_prefix("turn");
        turn.register("allocations", "Live TURN allocations", self.allocations.clone());
        turn.register("permissions", "Live TURN permissions", self.permissions.clone());
        turn.register("channels", "Live TURN channel bindings", self.channels.clone());
        turn.register("relayed_packets", "Packets relayed, by direction", self.relayed_packets.clone());
        turn.register("relayed_bytes", "Payload bytes relayed, by direction", self.relayed_bytes.clone());
        turn.register(
            "auth_failures",
            "Requests with wrong, expired or stale credentials",
            self.auth_failures.clone(),
        );
        turn.register(
            "denied_peers",
            "CreatePermission/ChannelBind refused by the peer policy",
            self.denied_peers.clone(),
        );
        turn.register(
            "quota_refusals",
            "Allocations refused by a quota (486, 508)",
            self.quota_refusals.clone(),
        );
        turn.register(
            "rate_limited",
            "Unauthenticated requests dropped by the per-source limit",
            self.rate_limited.clone(),
        );
        turn.register(
            "amplification_dropped",
            "Replies not sent because they would exceed 3x the unauthenticated request",
            self.amplification_dropped.clone(),
        );
        turn.register(
            "over_bandwidth_dropped",
            "Packets dropped by the per-allocation bandwidth cap",
            self.over_bandwidth_dropped.clone(),
        );
        turn.register(
            "unpermitted_dropped",
            "Packets dropped for want of a permission (client to an unpermitted peer, or from one)",
            self.unpermitted_dropped.clone(),
        );
        turn.register("connections", "Open TURN TCP and TLS connections", self.connections.clone());
        turn.register(
            "connections_refused",
            "TCP and TLS connections closed at once: their source had connections_per_source open, or \
             the relay max_connections",
            self.connections_refused.clone(),
        );
        turn.register(
            "shard_ticks",
            "Once-a-second passes of each relay shard (expiry, then these metrics); a count that stops \
             rising is a stuck shard",
            self.shard_ticks.clone(),
        );
        turn.register(
            "permission_refusals",
            "CreatePermission/ChannelBind refused (508): the allocation holds permissions_per_allocation",
            self.permission_refusals.clone(),
        );
        turn.register(
            "channel_refusals",
            "ChannelBind refused (508): the allocation holds channels_per_allocation",
            self.channel_refusals.clone(),
        );
        turn.register(
            "allocate_timeouts",
            "TCP and TLS clients hung up on after allocate_timeout_secs without an allocation",
            self.allocate_timeouts.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViaLabel {
    pub via: &'static str,
}

/// The client WebSocket and the signals it carries.
pub struct SignallingMetrics {
    pub connections: Gauge,
    pub connections_refused: Family<CodeLabel, Counter>,
    pub closed: Family<CodeLabel, Counter>,
    pub frames_received: Counter,
    pub errors: Family<CodeLabel, Counter>,
    /// Signals from clients, by how they reached the peer (`relay`, `matrix`, `failed`).
    pub signals_sent: Family<ViaLabel, Counter>,
    /// Signals from Matrix handed to a connected client.
    pub signals_from_matrix: Counter,
    /// Signals from Matrix that were Switchboard's own sends echoed back, not delivered again.
    pub echoes_dropped: Counter,
    /// Time from a client's signal to its `delivered`, by path.
    pub delivery_seconds: Family<ViaLabel, Histogram>,
    pub watched_addresses: Gauge,
    /// Signals for a peer not connected here that went through Matrix because Redis was down.
    pub cluster_fallbacks: Counter,
    /// Entries of the signalling service's bounded memories (`dialects`, `matrix_copies`,
    /// `room_peers`), each of which forgets its oldest entry when full.
    pub remembered: Family<TableLabel, Gauge>,
}

impl Default for SignallingMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            connections_refused: Family::default(),
            closed: Family::default(),
            frames_received: Counter::default(),
            errors: Family::default(),
            signals_sent: Family::default(),
            signals_from_matrix: Counter::default(),
            echoes_dropped: Counter::default(),
            // 50 µs .. ~1.6 s, doubling.
            delivery_seconds: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16))
            }),
            watched_addresses: Gauge::default(),
            cluster_fallbacks: Counter::default(),
            remembered: Family::default(),
        }
    }
}

impl SignallingMetrics {
    fn register(&self, registry: &mut Registry) {
        let signalling = registry.sub_registry_with_prefix("signalling");
        signalling.register(
            "connections",
            "Open client WebSockets on this instance",
            self.connections.clone(),
        );
        signalling.register(
            "connections_refused",
            "WebSocket upgrades refused, by reason (max_connections, max_connections_per_user, unauthorized)",
            self.connections_refused.clone(),
        );
        signalling.register("closed", "WebSockets closed by the server, by close code", self.closed.clone());
        signalling.register("frames_received", "Frames received from clients", self.frames_received.clone());
        signalling.register("errors", "Error frames sent to clients, by code", self.errors.clone());
        signalling.register(
            "signals_sent",
            "Signals from clients, by the path that took them (relay, matrix) or failed",
            self.signals_sent.clone(),
        );
        signalling.register(
            "signals_from_matrix",
            "Signals that arrived through Matrix and were handed to a connected client",
            self.signals_from_matrix.clone(),
        );
        signalling.register(
            "echoes_dropped",
            "Switchboard's own to-device sends seen again in the appservice stream, not delivered twice",
            self.echoes_dropped.clone(),
        );
        signalling.register(
            "remembered",
            "Entries of bounded memories: dialects (100,000 users), matrix_copies (10,000 transaction ids), room_peers (1,000 rooms)",
            self.remembered.clone(),
        );
        signalling.register(
            "delivery_seconds",
            "Time from a client's signal to its delivered frame, by path",
            self.delivery_seconds.clone(),
        );
        signalling.register(
            "cluster_fallbacks",
            "Signals that could not be offered to other instances (Redis down) and went through Matrix",
            self.cluster_fallbacks.clone(),
        );
        signalling.register(
            "watched_addresses",
            "Addresses watched by at least one connection on this instance",
            self.watched_addresses.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// The call broker.
pub struct CallsMetrics {
    pub started: Counter,
    pub connected: Counter,
    pub ended: Family<OutcomeLabel, Counter>,
    /// Signals the broker did not let through, by reason (duplicate, late, refusal codes, glare).
    pub stopped: Family<CodeLabel, Counter>,
    /// Invite seen to both sides `connected`.
    pub upgrade_seconds: Histogram,
    /// Pending calls (invited or answered, not yet established).
    pub live: Gauge,
    pub established: Gauge,
}

impl Default for CallsMetrics {
    fn default() -> Self {
        Self {
            started: Counter::default(),
            connected: Counter::default(),
            ended: Family::default(),
            stopped: Family::default(),
            // 10 ms .. ~160 s, doubling.
            upgrade_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.01, 2.0, 15,
            )),
            live: Gauge::default(),
            established: Gauge::default(),
        }
    }
}

impl CallsMetrics {
    fn register(&self, registry: &mut Registry) {
        let calls = registry.sub_registry_with_prefix("calls");
        calls.register("started", "Calls started (invites the broker let through)", self.started.clone());
        calls.register(
            "connected",
            "Calls whose two sides both reported their channel open",
            self.connected.clone(),
        );
        calls.register("ended", "Calls ended, by outcome", self.ended.clone());
        calls.register(
            "signals_stopped",
            "Signals the call broker did not let through, by reason",
            self.stopped.clone(),
        );
        calls.register(
            "upgrade_seconds",
            "Time from a call's invite to both sides reporting their data channel open",
            self.upgrade_seconds.clone(),
        );
        calls.register("live", "Pending calls (invited or answered, not yet connected)", self.live.clone());
        calls.register("established", "Calls both sides reported connected", self.established.clone());
    }
}

/// The inbox's size and retention.
#[derive(Default)]
pub struct InboxMetrics {
    /// Items the inbox holds, as of the last prune.
    pub items: Gauge,
    pub pruned_items: Counter,
    pub pruned_transactions: Counter,
    pub prune_errors: Counter,
}

impl InboxMetrics {
    fn register(&self, registry: &mut Registry) {
        let inbox = registry.sub_registry_with_prefix("inbox");
        inbox.register("items", "Items the inbox holds (counted after each prune)", self.items.clone());
        inbox.register(
            "pruned_items",
            "Inbox items deleted: every consumer had handled them and they were older than the retention",
            self.pruned_items.clone(),
        );
        inbox.register(
            "pruned_transactions",
            "Transaction ids deleted: older than the retention, and not among the newest kept for retries",
            self.pruned_transactions.clone(),
        );
        inbox.register(
            "prune_errors",
            "Prunes that failed (retried at the next interval)",
            self.prune_errors.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `appservice`, `client` or `ops`.
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    /// `known` (valid tokens) or `unknown` (tokens the homeserver does not know).
    pub cache: &'static str,
}

/// The HTTP listeners' connections and the client API's token checks.
#[derive(Default)]
pub struct HttpMetrics {
    pub connections: Family<ListenerLabel, Gauge>,
    pub connections_refused: Family<ListenerLabel, Counter>,
    pub header_timeouts: Family<ListenerLabel, Counter>,
    pub whoami_calls: Counter,
    pub token_cache_entries: Family<CacheLabel, Gauge>,
    pub token_checks_waiting: Gauge,
    pub unknown_token_limited: Counter,
}

impl HttpMetrics {
    fn register(&self, registry: &mut Registry) {
        let http = registry.sub_registry_with_prefix("http");
        http.register("connections", "Open HTTP connections, by listener", self.connections.clone());
        http.register(
            "connections_refused",
            "HTTP connections closed at once: the listener had max_connections open",
            self.connections_refused.clone(),
        );
        http.register(
            "header_timeouts",
            "HTTP connections closed because a request's headers did not arrive within header_read_timeout_secs (or an idle keep-alive connection sent none)",
            self.header_timeouts.clone(),
        );
        let client = registry.sub_registry_with_prefix("client");
        client.register(
            "whoami_calls",
            "Access-token checks (whoami) sent to the homeserver",
            self.whoami_calls.clone(),
        );
        client.register(
            "token_cache_entries",
            "Access tokens (as hashes) remembered, by cache",
            self.token_cache_entries.clone(),
        );
        client.register(
            "token_checks_waiting",
            "Requests waiting for a whoami call that is in flight",
            self.token_checks_waiting.clone(),
        );
        client.register(
            "unknown_token_limited",
            "Requests answered 429: their source sent too many tokens not known to be valid",
            self.unknown_token_limited.clone(),
        );
    }
}

/// Fan-out between instances (`[cluster]`, see docs/operations.md "Several instances").
#[derive(Default)]
pub struct ClusterMetrics {
    /// 1 while this instance's Redis connections are up (always 1 without Redis).
    pub up: Gauge,
    /// Channels this instance is subscribed to in Redis.
    pub channels: Gauge,
    pub published: Counter,
    /// Publishes refused because Redis was unreachable.
    pub publish_errors: Counter,
    pub received: Counter,
    /// Messages dropped for a subscriber that was not keeping up (it is told `Lost`).
    pub lost: Counter,
    /// Connections to Redis made again after one was lost.
    pub reconnects: Counter,
    /// Other instances whose connected users this one holds (`[cluster] max_instances`).
    pub remote_instances: Gauge,
    /// Users connected to other instances, summed over them (`max_users_per_instance` each).
    pub remote_users: Gauge,
    /// Users or instances refused past those bounds.
    pub remote_refused: Counter,
}

impl ClusterMetrics {
    fn register(&self, registry: &mut Registry) {
        let cluster = registry.sub_registry_with_prefix("cluster");
        cluster.register("up", "1 while the connections to Redis are up (1 without Redis)", self.up.clone());
        cluster.register(
            "channels",
            "Channels this instance is subscribed to in Redis",
            self.channels.clone(),
        );
        cluster.register("published", "Messages published to the other instances", self.published.clone());
        cluster.register(
            "publish_errors",
            "Publishes refused because Redis was unreachable",
            self.publish_errors.clone(),
        );
        cluster.register("received", "Messages received from the cluster", self.received.clone());
        cluster.register(
            "lost",
            "Messages dropped for a local subscriber that was not keeping up",
            self.lost.clone(),
        );
        cluster.register(
            "reconnects",
            "Connections to Redis made again after one was lost",
            self.reconnects.clone(),
        );
        cluster.register(
            "remote_instances",
            "Other instances whose connected users this instance holds",
            self.remote_instances.clone(),
        );
        cluster.register(
            "remote_users",
            "Users connected to other instances, summed over the instances",
            self.remote_users.clone(),
        );
        cluster.register(
            "remote_refused",
            "Users or instances refused past max_users_per_instance or max_instances",
            self.remote_refused.clone(),
        );
    }
}

/// Every metric Switchboard exports, registered once at start.
pub struct Metrics {
    registry: Registry,
    pub transactions_received: Counter,
    pub transactions_duplicate: Counter,
    pub transactions_reused_id: Counter,
    pub requests_rejected: Family<ReasonLabel, Counter>,
    pub items_stored: Family<KindLabel, Counter>,
    pub items_skipped: Counter,
    pub transaction_seconds: Histogram,
    pub database_errors: Counter,
    pub homeserver_errors: Counter,
    pub directory_users: Gauge,
    pub directory_lookups: Family<LookupLabel, Counter>,
    pub directory_lookups_dropped: Counter,
    pub directory: DirectoryMetrics,
    pub turn: TurnMetrics,
    pub inbox: InboxMetrics,
    pub http: HttpMetrics,
    pub signalling: SignallingMetrics,
    pub calls: CallsMetrics,
    pub cluster: ClusterMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[expect(clippy::too_many_lines, reason = "one registration per metric, in one place")]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let transactions_received = Counter::default();
        let transactions_duplicate = Counter::default();
        let transactions_reused_id = Counter::default();
        let requests_rejected = Family::<ReasonLabel, Counter>::default();
        let items_stored = Family::<KindLabel, Counter>::default();
        let items_skipped = Counter::default();
        // 0.5 ms .. ~4 s, doubling.
        let transaction_seconds =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14));
        let database_errors = Counter::default();
        let homeserver_errors = Counter::default();
        let directory_users = Gauge::default();
        let directory_lookups = Family::<LookupLabel, Counter>::default();
        let directory_lookups_dropped = Counter::default();
        registry.register(
            "appservice_transactions_received",
            "Transactions accepted from the homeserver (new ones, stored)",
            transactions_received.clone(),
        );
        registry.register(
            "appservice_transactions_duplicate",
            "Replayed transaction ids, answered 200 and not processed again",
            transactions_duplicate.clone(),
        );
        registry.register(
            "appservice_transactions_reused_id",
            "Transaction ids seen again with other content (a homeserver database reset?), stored as new",
            transactions_reused_id.clone(),
        );
        registry.register(
            "appservice_requests_rejected",
            "Appservice API requests refused, by reason",
            requests_rejected.clone(),
        );
        registry.register(
            "appservice_items_stored",
            "Events, ephemeral data and to-device messages stored, by kind",
            items_stored.clone(),
        );
        registry.register(
            "appservice_items_skipped",
            "Transaction items that were not JSON objects, left out of the store",
            items_skipped.clone(),
        );
        registry.register(
            "appservice_transaction_duration_seconds",
            "Time from receiving a transaction to answering it (parse and durable store)",
            transaction_seconds.clone(),
        );
        registry.register("database_errors", "Failed database operations", database_errors.clone());
        registry.register(
            "homeserver_errors",
            "Failed requests to the homeserver",
            homeserver_errors.clone(),
        );
        registry.register("directory_users", "Raiden users the directory knows", directory_users.clone());
        registry.register(
            "directory_lookups",
            "Profile and presence requests the directory made to the homeserver, by kind and outcome",
            directory_lookups.clone(),
        );
        registry.register(
            "directory_lookups_dropped",
            "Look-ups not queued because the queue was full",
            directory_lookups_dropped.clone(),
        );
        let directory = DirectoryMetrics::default();
        directory.register(&mut registry);
        let turn = TurnMetrics::default();
        turn.register(&mut registry);
        let inbox = InboxMetrics::default();
        inbox.register(&mut registry);
        let http = HttpMetrics::default();
        http.register(&mut registry);
        let signalling = SignallingMetrics::default();
        signalling.register(&mut registry);
        let calls = CallsMetrics::default();
        calls.register(&mut registry);
        let cluster = ClusterMetrics::default();
        cluster.register(&mut registry);
        Self {
            registry,
            transactions_received,
            transactions_duplicate,
            transactions_reused_id,
            requests_rejected,
            items_stored,
            items_skipped,
            transaction_seconds,
            database_errors,
            homeserver_errors,
            directory_users,
            directory_lookups,
            directory_lookups_dropped,
            directory,
            turn,
            inbox,
            http,
            signalling,
            calls,
            cluster,
        }
    }

    pub fn reject(&self, reason: Rejection) {
        self.requests_rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn lookup(&self, kind: &'static str, outcome: &'static str) {
        self.directory_lookups.get_or_create(&LookupLabel { kind, outcome }).inc();
    }

    pub fn stored(&self, kind: ItemKind, count: u64) {
        self.items_stored.get_or_create(&KindLabel { kind }).inc_by(count);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
