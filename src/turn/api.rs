//! `GET /_switchboard/client/v1/turn` on the client listener: TURN credentials for the caller (a
//! [`Caller`]: its Matrix access token checked with the homeserver), in the shape of Matrix's `/voip/turnServer`:
//! `{"username", "password", "uris", "ttl"}`. 404 `M_NOT_FOUND` when no TURN shared secret is
//! configured.

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::credentials::{self, Credentials};
use crate::clock::Clock;
use crate::config::Secret;
use crate::http::{Auth, Caller, MatrixError};

pub struct Api {
    /// The secret credentials are minted with; `None`: TURN is not configured.
    pub shared_secret: Option<Secret>,
    pub uris: Vec<String>,
    pub lifetime_secs: u64,
    pub auth: Auth,
    pub clock: Clock,
}

impl FromRef<Arc<Api>> for Auth {
    fn from_ref(api: &Arc<Api>) -> Auth {
        api.auth.clone()
    }
}

#[derive(Serialize)]
struct TurnServer<'a> {
    #[serde(flatten)]
    credentials: Credentials,
    uris: &'a [String],
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new().route("/_switchboard/client/v1/turn", get(turn_server)).with_state(api)
}

#[tracing::instrument(name = "turn.credentials", level = "debug", skip_all)]
async fn turn_server(
    Caller(caller): Caller,
    State(api): State<Arc<Api>>,
) -> Result<Json<serde_json::Value>, MatrixError> {
    let secret =
        api.shared_secret.as_ref().ok_or_else(|| MatrixError::not_found("TURN is not configured here"))?;
    let now = api.clock.unix_secs();
    let credentials =
        credentials::mint(secret.expose().as_bytes(), caller.user_id.as_str(), now, api.lifetime_secs);
    Ok(Json(serde_json::json!(TurnServer { credentials, uris: &api.uris })))
}
