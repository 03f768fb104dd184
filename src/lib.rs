//! Switchboard: a Matrix application service that lets Raiden nodes upgrade from messages sent
//! through the homeserver to direct WebRTC data channels, and fall back when a channel breaks.
//!
//! Module map (one folder per capability, protocol logic apart from IO):
//! - [`config`]: typed configuration, `SWITCHBOARD_*` overrides, `*_file` secrets, validation.
//! - [`appservice`]: homeserver → Switchboard (transactions, queries, ping); the stored input stream.
//! - [`homeserver`]: Switchboard → homeserver (whoami, masquerading, ping, sender registration).
//! - [`directory`]: presence and discovery: who is online, which address they provably hold, what
//!   they can do; fed by the inbox, the homeserver and signalling connections.
//! - [`turn`]: TURN/STUN: credentials for Synapse, coturn and the embedded relay, which runs one
//!   shard per core.
//! - [`clock`]: wall and monotonic time, passed in; a manual clock that tests step.
//! - [`store`]: SQLite or PostgreSQL behind one type, with per-backend migrations.
//! - [`ops`]: `/health`, `/ready`, `/metrics`.
//! - [`http`], [`telemetry`]: Matrix error JSON and serving; logs and metrics.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests bind port 0 and call it.

pub mod appservice;
pub mod clock;
pub mod config;
pub mod directory;
pub mod homeserver;
pub mod http;
pub mod ops;
pub mod store;
pub mod telemetry;
pub mod turn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::appservice::Appservice;
use crate::appservice::inbox::Subscription;
use crate::clock::Clock;
use crate::config::Config;
use crate::directory::service::DirectoryService;
use crate::homeserver::{HomeserverClient, HomeserverError};
use crate::ops::Ops;
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Homeserver(#[from] HomeserverError),
    #[error("listener failed: {0}")]
    Listener(#[from] std::io::Error),
    #[error("connections were still open {0:?} after shutdown began; closed them")]
    ShutdownTimeout(Duration),
}

/// How long in-flight requests may take to finish once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The listeners, bound before [`run`] so that tests can bind port 0: three TCP listeners, and the
/// embedded TURN relay's UDP socket when `[turn] mode = "embedded"`.
pub struct Listeners {
    pub appservice: TcpListener,
    pub client: TcpListener,
    pub ops: TcpListener,
    pub turn: Option<turn::io::Listeners>,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let turn = match config.turn.mode {
            config::TurnMode::Embedded => {
                let tls = match (config.turn.tls_listen, &config.turn.tls_certificate, &config.turn.tls_key) {
                    (Some(addr), Some(certificate), Some(key)) => {
                        Some((addr, turn::tls_acceptor(certificate, key).map_err(std::io::Error::other)?))
                    }
                    _ => None,
                };
                Some(turn::io::Listeners::bind(config.turn.listen, tls, turn::shards(config))?)
            }
            config::TurnMode::External | config::TurnMode::Off => None,
        };
        Ok(Self {
            appservice: bind(config.appservice.listen).await?,
            client: bind(config.client.listen).await?,
            ops: bind(config.ops.listen).await?,
            turn,
        })
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Runs Switchboard until `shutdown` is cancelled: stops accepting, lets in-flight requests (and so
/// in-flight transactions) finish within [`SHUTDOWN_GRACE`], stops background tasks and closes the
/// store.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with_clock(config, listeners, Clock::system(), shutdown).await
}

/// [`run`] on a given clock (tests pass a [`Clock::manual`] and step it).
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    clock: Clock,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(Store::connect(&config.database.url, config.database.max_connections).await?);
    if config.database.migrate_on_start {
        store.migrate().await?;
    }
    let homeserver = Arc::new(HomeserverClient::new(&config, metrics.clone())?);
    let discovery = DirectoryService::load(
        store.clone(),
        homeserver.clone(),
        metrics.clone(),
        directory::service::Settings::from_config(&config),
        clock.unix_millis(),
    )
    .await?;
    let discovery_inbox = Subscription::open(store.clone(), directory::service::CONSUMER).await?;

    let appservice = appservice::router(Arc::new(Appservice {
        hs_token: config.hs_token().clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        max_transaction_bytes: config.appservice.max_transaction_bytes,
    }));
    let discovery_api = directory::api::Api {
        directory: discovery.clone(),
        homeserver: homeserver.clone(),
        anonymous_read: config.directory.anonymous_read,
    };
    let turn_api = turn::api::Api {
        // `mode = "off"`: no credentials either.
        shared_secret: config
            .turn
            .shared_secret
            .clone()
            .filter(|_| config.turn.mode != config::TurnMode::Off),
        uris: turn::client_uris(&config, listeners.turn.as_ref()),
        lifetime_secs: config.turn.user_lifetime_secs,
    };
    let client = http::with_fallbacks(
        client_router()
            .merge(directory::api::router(Arc::new(discovery_api)))
            .merge(turn::api::router(Arc::new(turn_api), homeserver.clone())),
    );
    let ops = ops::router(Arc::new(Ops {
        store: store.clone(),
        homeserver: homeserver.clone(),
        metrics: metrics.clone(),
    }));

    let turn_listener = listeners.turn;
    tracing::info!(
        turn = ?turn_listener.as_ref().and_then(|listeners| listeners.local_addr().ok()),
        appservice = %listeners.appservice.local_addr()?,
        client = %listeners.client.local_addr()?,
        ops = %listeners.ops.local_addr()?,
        database = ?store.backend(),
        "switchboard.start: listening"
    );

    let tasks = TaskTracker::new();
    tasks.spawn(homeserver.clone().watch_health(shutdown.clone()));
    tasks.spawn(discovery.clone().consume(discovery_inbox, shutdown.clone()));
    tasks.spawn(discovery.refresh(shutdown.clone()));
    if let Some(listeners) = turn_listener {
        tasks.spawn(turn::io::serve(
            turn::embedded(&config),
            listeners,
            metrics.clone(),
            clock.clone(),
            shutdown.clone(),
        ));
    }
    tasks.close();

    let serving = async {
        tokio::try_join!(
            serve_or_stop(listeners.appservice, appservice, &shutdown),
            serve_or_stop(listeners.client, client, &shutdown),
            serve_or_stop(listeners.ops, ops, &shutdown),
        )
    };
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let served = tokio::select! {
        served = serving => served.map(|_| ()).map_err(RunError::from),
        // A client that never finishes its request must not hold the process forever.
        () = grace_over => Err(RunError::ShutdownTimeout(SHUTDOWN_GRACE)),
    };
    shutdown.cancel();
    tasks.wait().await;
    store.close().await;
    served?;
    tracing::info!("switchboard.stop: stopped cleanly");
    Ok(())
}

/// Serves one listener; if it fails, stops the others too.
async fn serve_or_stop(
    listener: TcpListener,
    router: Router,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let result = http::serve(listener, router, shutdown.clone()).await;
    if let Err(error) = &result {
        tracing::error!(%error, "switchboard.listener failed; shutting down");
        shutdown.cancel();
    }
    result
}

/// The client API's own routes (`/_switchboard/client/versions`); capabilities add theirs.
fn client_router() -> Router {
    Router::new().route(
        "/_switchboard/client/versions",
        get(|| async { axum::Json(serde_json::json!({ "versions": ["v1"] })) }),
    )
}

/// Wall-clock time in unix milliseconds (what the store and Matrix timestamps use).
pub(crate) fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
