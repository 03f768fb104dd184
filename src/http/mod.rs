//! What every listener shares: Matrix error JSON, fallbacks, the access token a request presents,
//! serving a router until shutdown ([`serve`]: connection cap, header-read and request timeouts, body
//! limit), and who is calling the client API ([`auth`]: the [`Caller`] extractor and its token
//! checks).

pub mod auth;
mod serve;

use std::borrow::Cow;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;

pub use auth::{Auth, Caller};
pub use serve::{ServeSettings, serve};

/// A Matrix error response: `{"errcode": "M_…", "error": "…"}` with its HTTP status.
#[derive(Debug, Clone)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: Cow<'static, str>,
    /// For `M_LIMIT_EXCEEDED`: when to try again (also sent as `Retry-After`, in seconds).
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct MatrixErrorBody<'a> {
    errcode: &'a str,
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<Cow<'static, str>>) -> Self {
        Self { status, errcode, error: error.into(), retry_after: None }
    }

    /// 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`.
    pub fn limit_exceeded(error: impl Into<Cow<'static, str>>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", error)
        }
    }

    pub fn not_found(error: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", error)
    }

    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }

    pub fn unknown(error: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", error)
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let retry_after_ms = self.retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let body = MatrixErrorBody { errcode: self.errcode, error: &self.error, retry_after_ms };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(retry_after) = self.retry_after {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}

/// Fallback for unknown paths: 404 `M_UNRECOGNIZED`, as Matrix servers answer.
pub async fn unrecognized() -> MatrixError {
    MatrixError::unrecognized()
}

/// Fallback for a known path with the wrong method: 405 `M_UNRECOGNIZED`.
pub async fn method_not_allowed() -> MatrixError {
    MatrixError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Method not allowed")
}

/// The token a request presents: `Authorization: Bearer <token>` (the scheme is case-insensitive,
/// RFC 9110 §11.1), or else the legacy `access_token` query parameter.
pub fn access_token(headers: &http::HeaderMap, uri: &http::Uri) -> Option<String> {
    if headers.contains_key(http::header::AUTHORIZATION) {
        return bearer_token(headers);
    }
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into_owned())
}

/// The CORS layer of the client API for `origins` (`["*"]`: any origin); `None` when empty. Tokens
/// travel in the `Authorization` header, never in cookies, so credentials are not allowed.
pub fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|origin| http::HeaderValue::from_str(origin).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([http::Method::GET, http::Method::POST, http::Method::OPTIONS])
            .allow_headers([http::header::AUTHORIZATION, http::header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// The token of `Authorization: Bearer <token>` alone (the scheme is case-insensitive); for routes
/// that never take one from the URL.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<String> {
    let (scheme, token) = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

/// Gives a router the Matrix-style fallbacks.
pub fn with_fallbacks(router: Router) -> Router {
    router.fallback(unrecognized).method_not_allowed_fallback(method_not_allowed)
}
