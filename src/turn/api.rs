//! `GET /_switchboard/client/v1/turn` on the client listener: TURN credentials for the caller (its
//! Matrix access token checked with `whoami`), in the shape of Matrix's `/voip/turnServer`:
//! `{"username", "password", "uris", "ttl"}`. 404 `M_NOT_FOUND` when no TURN shared secret is
//! configured.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;

use super::credentials::{self, Credentials};
use crate::config::Secret;
use crate::homeserver::{HomeserverClient, Whoami};
use crate::http::MatrixError;

pub struct Api {
    /// The secret credentials are minted with; `None`: TURN is not configured.
    pub shared_secret: Option<Secret>,
    pub uris: Vec<String>,
    pub lifetime_secs: u64,
}

#[derive(Serialize)]
struct TurnServer<'a> {
    #[serde(flatten)]
    credentials: Credentials,
    uris: &'a [String],
}

pub fn router(api: Arc<Api>, homeserver: Arc<HomeserverClient>) -> Router {
    Router::new()
        .route("/_switchboard/client/v1/turn", get(turn_server))
        .route_layer(axum::middleware::from_fn_with_state(homeserver, crate::http::require_user))
        .with_state(api)
}

async fn turn_server(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Whoami>,
) -> Result<Json<serde_json::Value>, MatrixError> {
    let secret =
        api.shared_secret.as_ref().ok_or_else(|| MatrixError::not_found("TURN is not configured here"))?;
    let now = u64::try_from(crate::unix_millis() / 1000).unwrap_or(0);
    let credentials =
        credentials::mint(secret.expose().as_bytes(), caller.user_id.as_str(), now, api.lifetime_secs);
    Ok(Json(serde_json::json!(TurnServer { credentials, uris: &api.uris })))
}
