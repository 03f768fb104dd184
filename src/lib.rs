//! Switchboard: a Matrix application service that lets Raiden nodes upgrade from messages sent
//! through the homeserver to direct WebRTC data channels, and fall back when a channel breaks.
//!
//! Module map (one folder per capability, protocol logic apart from IO):
//! - [`config`]: typed configuration, `SWITCHBOARD_*` overrides, `*_file` secrets, validation.
//! - [`appservice`]: homeserver → Switchboard (transactions, queries, ping); the stored input stream.
//! - [`homeserver`]: Switchboard → homeserver (whoami, masquerading, ping, sender registration).
//! - [`directory`]: presence and discovery: who is online, which address they provably hold, what
//!   they can do; fed by the inbox, the homeserver and signalling connections.
//! - [`signalling`]: the client WebSocket (protocol v1): signals relayed between connected
//!   clients, bridged to Matrix (to-device) for the others, presence pushed to watchers.
//! - [`calls`]: the call broker, a sans-IO state machine per call.
//! - `client` (feature `client`, on by default): the thin client, data channels with Matrix as the
//!   base layer, exactly once and in order.
//! - [`turn`]: TURN/STUN: credentials for Synapse, coturn and the embedded relay, which runs one
//!   shard per core.
//! - [`cluster`]: fan-out between instances (Redis pub/sub, or in-process alone): inbox wakes and
//!   who is connected where.
//! - [`clock`]: wall and monotonic time, passed in; a manual clock that tests step.
//! - [`store`]: SQLite or PostgreSQL behind one type, with per-backend migrations.
//! - [`browser`]: the browser client module (`clients/browser/`) served on the client listener.
//! - [`ops`]: `/health`, `/ready`, `/metrics`.
//! - [`http`], [`telemetry`]: Matrix error JSON, serving with limits, who calls the client API;
//!   logs and metrics.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests bind port 0 and call it.

pub mod appservice;
pub mod browser;
pub mod calls;
#[cfg(feature = "client")]
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod directory;
pub mod homeserver;
pub mod http;
pub mod ops;
pub mod signalling;
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
#[expect(clippy::too_many_lines, reason = "the one place where every part is built and wired together")]
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    clock: Clock,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(Store::connect(config.database_url(), config.database.max_connections).await?);
    if config.database.migrate_on_start {
        store.migrate().await?;
    }
    let homeserver = Arc::new(HomeserverClient::new(&config, metrics.clone())?);
    let discovery = DirectoryService::load(
        store.clone(),
        homeserver.clone(),
        metrics.clone(),
        directory::service::Settings::from_config(&config),
        clock.clone(),
    )
    .await?;
    let (cluster, cluster_task) =
        cluster::start(&config, &discovery, metrics.clone(), clock.clone(), shutdown.clone());
    let inbox = |consumer| {
        let woken = cluster.subscribe(appservice::inbox::WAKE_CHANNEL);
        let opened =
            Subscription::open(store.clone(), consumer, &config.database.instance_name, clock.clone());
        async move { Ok::<_, StoreError>(opened.await?.woken_by(woken)) }
    };
    let discovery_inbox = inbox(directory::service::CONSUMER).await?;

    let appservice = appservice::router(Arc::new(Appservice {
        hs_token: config.hs_token().clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        clock: clock.clone(),
        cluster: cluster.clone(),
    }));
    let auth = http::Auth::new(
        homeserver.clone(),
        http::auth::AuthSettings::from_config(&config),
        clock.clone(),
        metrics.clone(),
    );
    let turn_uris = turn::client_uris(&config, listeners.turn.as_ref());
    let signalling = signalling::service::Signalling::new(
        signalling::service::Settings::from_config(&config, turn_uris.clone()),
        signalling::service::Parts {
            directory: discovery.clone(),
            homeserver: homeserver.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            cluster: cluster.clone(),
            shutdown: shutdown.clone(),
        },
    );
    let signalling_inbox = inbox(signalling::service::CONSUMER).await?;
    let client = client_router(&config, auth, discovery.clone(), turn_uris, signalling.clone(), &clock);
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
        database = %config.database_url_redacted(),
        instance = %config.database.instance_name,
        "switchboard.start: listening"
    );

    let tasks = TaskTracker::new();
    tasks.spawn(homeserver.clone().watch_health(shutdown.clone()));
    tasks.spawn(discovery.clone().consume(discovery_inbox, shutdown.clone()));
    tasks.spawn(cluster_task);
    tasks.spawn(discovery.refresh(shutdown.clone()));
    tasks.spawn(signalling.clone().consume(signalling_inbox, shutdown.clone()));
    tasks.spawn(signalling.clone().push_presence(shutdown.clone()));
    tasks.spawn(signalling.clone().run_calls(shutdown.clone()));
    tasks.spawn(signalling.clone().take_answers(shutdown.clone()));
    tasks.spawn(appservice::inbox::prune(
        store.clone(),
        config.inbox_retention(),
        metrics.clone(),
        clock.clone(),
        shutdown.clone(),
    ));
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

    let served = serve_all(
        [(listeners.appservice, appservice), (listeners.client, client), (listeners.ops, ops)],
        &config,
        &metrics,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    // Sockets got their close frame when shutdown began; their tasks end within a second.
    signalling.tasks.close();
    signalling.tasks.wait().await;
    tasks.wait().await;
    store.close().await;
    served?;
    tracing::info!("switchboard.stop: stopped cleanly");
    Ok(())
}

/// Serves the appservice, client and ops listeners until `shutdown`, then lets in-flight requests
/// finish within [`SHUTDOWN_GRACE`].
async fn serve_all(
    [appservice, client, ops]: [(TcpListener, Router); 3],
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let serve = |(listener, router), settings| serve_or_stop(listener, router, settings, metrics, shutdown);
    let serving = async {
        tokio::try_join!(
            serve(appservice, http::ServeSettings::appservice(config)),
            serve(client, http::ServeSettings::client(config)),
            serve(ops, http::ServeSettings::ops(config)),
        )
    };
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = serving => served.map(|_| ()).map_err(RunError::from),
        // A client that never finishes its request must not hold the process forever.
        () = grace_over => Err(RunError::ShutdownTimeout(SHUTDOWN_GRACE)),
    }
}

/// Serves one listener; if it fails, stops the others too.
async fn serve_or_stop(
    listener: TcpListener,
    router: Router,
    settings: http::ServeSettings,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let result = http::serve(listener, router, settings, metrics.clone(), shutdown.clone()).await;
    if let Err(error) = &result {
        tracing::error!(%error, "switchboard.listener failed; shutting down");
        shutdown.cancel();
    }
    result
}

/// The client API: its own routes (`/_switchboard/client/versions`) and the capabilities'.
fn client_router(
    config: &Config,
    auth: http::Auth,
    directory: Arc<DirectoryService>,
    turn_uris: Vec<String>,
    signalling: Arc<signalling::service::Signalling>,
    clock: &Clock,
) -> Router {
    let discovery_api = directory::api::Api {
        directory,
        auth: auth.clone(),
        anonymous_read: config.directory.anonymous_read,
        clock: clock.clone(),
    };
    let turn_api = turn::api::Api {
        // `mode = "off"`: no credentials either.
        shared_secret: config
            .turn
            .shared_secret
            .clone()
            .filter(|_| config.turn.mode != config::TurnMode::Off),
        uris: turn_uris,
        lifetime_secs: config.turn.user_lifetime_secs,
        auth,
        clock: clock.clone(),
    };
    let versions = Router::new().route(
        "/_switchboard/client/versions",
        get(|| async { axum::Json(serde_json::json!({ "versions": ["v1"] })) }),
    );
    let router = http::with_fallbacks(
        versions
            .merge(directory::api::router(Arc::new(discovery_api)))
            .merge(turn::api::router(Arc::new(turn_api)))
            .merge(signalling::api::router(signalling)),
    );
    let router = match http::cors(&config.client.cors_allowed_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    // The public files answer `Access-Control-Allow-Origin: *` themselves, outside the API's CORS.
    browser::router().merge(router)
}
