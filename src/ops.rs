//! The ops listener (private by default): `/health` (the process is alive), `/ready` (the database
//! answers and the homeserver ping works both ways, with JSON detail; 503 otherwise), `POST /ping` (check the homeserver now) and
//! `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use http::header::CONTENT_TYPE;
use serde_json::json;

use crate::homeserver::HomeserverClient;
use crate::http::with_fallbacks;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Longest a readiness probe waits for the database.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Ops {
    pub store: Arc<Store>,
    pub homeserver: Arc<HomeserverClient>,
    pub metrics: Arc<Metrics>,
}

pub fn router(ops: Arc<Ops>) -> Router {
    with_fallbacks(
        Router::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/ping", post(ping))
            .route("/metrics", get(metrics))
            .with_state(ops),
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(ops): State<Arc<Ops>>) -> Response {
    let database = match tokio::time::timeout(DATABASE_PROBE_TIMEOUT, ops.store.ping()).await {
        Ok(Ok(())) => json!({ "ok": true }),
        Ok(Err(error)) => {
            ops.metrics.database_errors.inc();
            json!({ "ok": false, "error": error.to_string() })
        }
        Err(_) => json!({ "ok": false, "error": "timed out" }),
    };
    let homeserver = ops.homeserver.status();
    let ready = database["ok"] == true && homeserver.healthy();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready, "database": database, "homeserver": homeserver }))).into_response()
}

/// Pings the homeserver (which pings us back) now; 200 with the result when both directions work.
async fn ping(State(ops): State<Arc<Ops>>) -> Response {
    let status = ops.homeserver.check().await;
    let code = if status.healthy() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status)).into_response()
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], ops.metrics.render())
        .into_response()
}
