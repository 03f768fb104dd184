//! Homeserver → Switchboard: the Application Service API (spec: "Application Service API", v1).
//!
//! Endpoints, all behind `hs_token` authentication:
//! - `PUT  /_matrix/app/v1/transactions/{txnId}`: stores the transaction durably, then answers 200.
//! - `GET  /_matrix/app/v1/users/{userId}`, `GET /_matrix/app/v1/rooms/{roomAlias}`: 404, Switchboard
//!   creates no users or rooms on demand.
//! - `POST /_matrix/app/v1/ping`: 200 `{}`.
//! - `GET  /_matrix/app/v1/thirdparty/…`: 404, Switchboard bridges no third-party network.
//! - The legacy unprefixed `/transactions`, `/users`, `/rooms` and `/_matrix/app/unstable/thirdparty`.
//!
//! What was stored is handed to the rest of Switchboard through [`inbox::Subscription`].

pub mod inbox;
pub mod registration;
mod transaction;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http::StatusCode;

use crate::config::Secret;
use crate::http::{MatrixError, with_fallbacks};
use crate::store::Store;
use crate::telemetry::{Metrics, Rejection};

/// What the appservice API needs.
pub struct Appservice {
    pub hs_token: Secret,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// When transactions are received (their items' retention counts from it).
    pub clock: crate::clock::Clock,
    /// Where stored transactions are announced to the other instances' inbox subscriptions.
    pub cluster: crate::cluster::Cluster,
}

/// The router of the appservice listener.
pub fn router(appservice: Arc<Appservice>) -> Router {
    let routes = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction::put))
        .route("/transactions/{txn_id}", put(transaction::put))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{room_alias}", get(query_room))
        .route("/rooms/{room_alias}", get(query_room))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/v1/thirdparty/{*rest}", get(thirdparty))
        .route("/_matrix/app/unstable/thirdparty/{*rest}", get(thirdparty))
        .route_layer(middleware::from_fn_with_state(appservice.clone(), authenticate))
        .with_state(appservice);
    with_fallbacks(routes)
}

/// Checks the homeserver's token: `Authorization: Bearer` or the legacy `access_token` query
/// parameter. Missing → 401 `M_UNAUTHORIZED`; wrong → 403 `M_FORBIDDEN`. Compared in constant time.
async fn authenticate(State(appservice): State<Arc<Appservice>>, request: Request, next: Next) -> Response {
    let Some(token) = crate::http::access_token(request.headers(), request.uri()) else {
        appservice.metrics.reject(Rejection::MissingToken);
        tracing::warn!(path = request.uri().path(), "appservice request without a homeserver token");
        return MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "Missing homeserver token")
            .into_response();
    };
    if !appservice.hs_token.matches(token.as_bytes()) {
        appservice.metrics.reject(Rejection::WrongToken);
        tracing::warn!(path = request.uri().path(), "appservice request with a wrong homeserver token");
        return MatrixError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Wrong homeserver token")
            .into_response();
    }
    next.run(request).await
}

async fn query_user() -> MatrixError {
    MatrixError::not_found("Switchboard does not create users on demand")
}

async fn query_room() -> MatrixError {
    MatrixError::not_found("Switchboard does not create rooms on demand")
}

async fn thirdparty() -> MatrixError {
    MatrixError::not_found("Switchboard bridges no third-party protocol")
}

/// `POST /_matrix/app/v1/ping`: the homeserver checks that it can reach us.
async fn ping() -> impl IntoResponse {
    tracing::debug!("appservice.ping from the homeserver");
    axum::Json(serde_json::json!({}))
}
