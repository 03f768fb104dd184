//! `GET /_switchboard/client/v1/connect` on the client listener: the client WebSocket (protocol v1,
//! docs/protocol.md). The access token comes in `Authorization: Bearer …`, checked before the
//! upgrade (a bad one gets Matrix error JSON), or, for browsers, in an `auth` frame; never in the URL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use http::{HeaderMap, StatusCode, Uri};

use super::protocol::HARD_FRAME_BYTES;
use super::service::Signalling;
use crate::http::MatrixError;
use crate::telemetry::CodeLabel;

/// The socket's read buffer: small, because most sockets are idle (tungstenite's default of
/// 128 KiB per socket would be 1.3 GB for 10,000 of them); it grows for a large frame.
const READ_BUFFER: usize = 4 * 1024;

/// Bytes of frames waiting in the socket's write buffer before writes push back.
const MAX_WRITE_BUFFER: usize = 256 * 1024;

pub fn router(service: Arc<Signalling>) -> Router {
    Router::new().route("/_switchboard/client/v1/connect", get(connect)).with_state(service)
}

#[tracing::instrument(name = "signalling.upgrade", level = "debug", skip_all)]
async fn connect(
    State(service): State<Arc<Signalling>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let refused = |code: &'static str, error: MatrixError| {
        service.metrics.signalling.connections_refused.get_or_create(&CodeLabel { code }).inc();
        error.into_response()
    };
    if uri.query().is_some_and(|query| query.contains("access_token")) {
        let error = MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            "The access token goes in the Authorization header or the auth frame, never in the URL",
        );
        return refused("token_in_url", error);
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let error = MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_REQUEST", rejection.body_text());
            return refused("not_websocket", error);
        }
    };
    if !service.hub.has_room() {
        let error = MatrixError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..MatrixError::limit_exceeded(
                "This instance has all the sockets it takes",
                Duration::from_secs(5),
            )
        };
        return refused("max_connections", error);
    }
    let source = peer.map(|Extension(ConnectInfo(address))| address.ip());
    let authenticated = match crate::http::bearer_token(&headers) {
        None => None,
        Some(token) => match service.auth.check(&token, source).await {
            Ok(whoami) => Some((whoami, token)),
            Err(error) => return refused("unauthorized", error),
        },
    };
    if let Some((whoami, _)) = &authenticated
        && service.hub.sockets_of(whoami.user_id.as_str()).len()
            >= service.settings.limits.max_connections_per_user
    {
        let error = MatrixError::limit_exceeded(
            "This user has max_connections_per_user sockets open",
            Duration::from_secs(5),
        );
        return refused("max_connections_per_user", error);
    }
    let tasks = service.tasks.clone();
    let upgraded_at = service.clock.now();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(HARD_FRAME_BYTES)
        .max_frame_size(HARD_FRAME_BYTES)
        .on_upgrade(move |socket| {
            tasks.track_future(super::socket::run(service, socket, authenticated, source, upgraded_at))
        })
}
