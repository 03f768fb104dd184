//! Serving a router on a TCP listener until shutdown, so that slow or many clients cannot hold it:
//! at most `max_connections` open connections (more are closed at once and counted), a request's
//! headers within `header_read_timeout` (hyper's timer, which also closes keep-alive connections
//! idle that long), the whole request within `request_timeout` (408), and bodies of at most
//! `max_body_bytes` (413 from the extractors that read them).
//!
//! `axum::serve` is not used: it sets no timer on hyper's connection builder, so hyper's header
//! timeout never fires there.

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::{Extension, Router};
use http::StatusCode;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;

use super::MatrixError;
use crate::config::Config;
use crate::telemetry::{ListenerLabel, Metrics};

/// Largest request body on the ops listener, whose endpoints read none.
const OPS_MAX_BODY_BYTES: usize = 4096;
/// Wait after an `accept` error that is not about one connection (such as running out of file
/// descriptors), so that the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What one listener allows.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// `appservice`, `client` or `ops`: the `listener` label of the metrics.
    pub name: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
}

impl ServeSettings {
    /// The `[appservice]` listener's: its body limit is `max_transaction_bytes`.
    pub fn appservice(config: &Config) -> Self {
        let section = &config.appservice;
        Self {
            name: "appservice",
            max_connections: section.max_connections,
            header_read_timeout: Duration::from_secs(section.header_read_timeout_secs),
            request_timeout: Duration::from_secs(section.request_timeout_secs),
            max_body_bytes: section.max_transaction_bytes,
        }
    }

    /// The `[client]` listener's.
    pub fn client(config: &Config) -> Self {
        let section = &config.client;
        Self {
            name: "client",
            max_connections: section.max_connections,
            header_read_timeout: Duration::from_secs(section.header_read_timeout_secs),
            request_timeout: Duration::from_secs(section.request_timeout_secs),
            max_body_bytes: section.max_body_bytes,
        }
    }

    /// The `[ops]` listener's.
    pub fn ops(config: &Config) -> Self {
        let section = &config.ops;
        Self {
            name: "ops",
            max_connections: section.max_connections,
            header_read_timeout: Duration::from_secs(section.header_read_timeout_secs),
            request_timeout: Duration::from_secs(section.request_timeout_secs),
            max_body_bytes: OPS_MAX_BODY_BYTES,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and lets
/// in-flight requests finish (idle connections are closed at once); returns when every connection
/// is closed. Handlers can read the peer's address as `ConnectInfo<SocketAddr>`.
///
/// Every accepted socket gets `TCP_NODELAY`: Synapse sends one transaction at a time, and without it
/// Nagle's algorithm and delayed ACKs add ~40 ms to each one.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ServeSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let label = ListenerLabel { listener: settings.name };
    let router = router.layer(DefaultBodyLimit::max(settings.max_body_bytes)).layer(
        ServiceBuilder::new().layer(HandleErrorLayer::new(timed_out)).timeout(settings.request_timeout),
    );
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(settings.header_read_timeout);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let connections = TaskTracker::new();
    let open = metrics.http.connections.get_or_create(&label).clone();
    let refused = metrics.http.connections_refused.get_or_create(&label).clone();
    let header_timeouts = metrics.http.header_timeouts.get_or_create(&label).clone();
    loop {
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    tracing::error!(%error, listener = settings.name, "http.accept failed");
                    // Socket-level timing runs on real time, like hyper's timer.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.inc();
            tracing::debug!(listener = settings.name, "http.accept: at max_connections, closed");
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(
            ServiceBuilder::new().layer(Extension(ConnectInfo(remote))).service(router.clone()),
        );
        // Note for the WebSocket route: an upgraded connection leaves this task, and with it its
        // `max_connections` slot and the task tracker; the upgrade handler must hold its own bound.
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let shutdown = shutdown.clone();
        let (open, header_timeouts) = (open.clone(), header_timeouts.clone());
        open.inc();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                if error.is_timeout() {
                    header_timeouts.inc();
                } else {
                    tracing::debug!(%error, "http.connection ended with an error");
                }
            }
            open.dec();
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// `accept` errors about one connection only: the next one may work.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// The request timeout's answer (the router itself never fails).
async fn timed_out(_: axum::BoxError) -> MatrixError {
    MatrixError::new(StatusCode::REQUEST_TIMEOUT, "M_UNKNOWN", "The request took too long")
}
