//! The browser client's files on the client listener, public and cacheable:
//! - `GET /_switchboard/client/v1/switchboard.js` — the ES module (`clients/browser/switchboard.js`);
//! - `GET /_switchboard/client/v1/switchboard.d.ts` — its TypeScript declarations;
//! - `GET /_switchboard/client/v1/demo.html` — a demo page (presence, path, round-trip time).
//!
//! The files are embedded at build time. Each answer carries a strong `ETag` (SHA-256 of the
//! content), `Cache-Control: public, max-age=300, must-revalidate`, and `Access-Control-Allow-Origin:
//! *` (they hold no secret, so any page may load them); `If-None-Match` with the current tag is
//! answered 304 without a body. These routes sit outside the client API's CORS layer, which is for
//! the authenticated endpoints.

use std::sync::LazyLock;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};

/// How long a browser may use a file before asking again (with `If-None-Match`).
const CACHE_CONTROL: &str = "public, max-age=300, must-revalidate";

/// One embedded file.
struct File {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
    etag: String,
}

impl File {
    fn new(path: &'static str, content_type: &'static str, body: &'static str) -> Self {
        let digest = Sha256::digest(body.as_bytes());
        Self { path, content_type, body, etag: format!("\"{}\"", hex::encode(&digest[..16])) }
    }
}

static FILES: LazyLock<[File; 3]> = LazyLock::new(|| {
    [
        File::new(
            "/_switchboard/client/v1/switchboard.js",
            "text/javascript; charset=utf-8",
            include_str!("../clients/browser/switchboard.js"),
        ),
        File::new(
            "/_switchboard/client/v1/switchboard.d.ts",
            "application/typescript; charset=utf-8",
            include_str!("../clients/browser/switchboard.d.ts"),
        ),
        File::new(
            "/_switchboard/client/v1/demo.html",
            "text/html; charset=utf-8",
            include_str!("../clients/browser/demo.html"),
        ),
    ]
});

/// The routes of the embedded files.
pub fn router() -> Router {
    FILES.iter().enumerate().fold(Router::new(), |router, (index, file)| {
        router.route(file.path, get(move |headers: HeaderMap| async move { serve(&FILES[index], &headers) }))
    })
}

fn serve(file: &File, request: &HeaderMap) -> Response {
    let matches = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == file.etag);
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, HeaderValue::from_str(&file.etag).expect("hex etag"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if matches {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(file.content_type));
    (StatusCode::OK, headers, file.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_differ_per_file_and_are_quoted() {
        let tags: Vec<&str> = FILES.iter().map(|file| file.etag.as_str()).collect();
        assert!(tags.iter().all(|tag| tag.starts_with('"') && tag.ends_with('"') && tag.len() == 34));
        assert_ne!(tags[0], tags[1]);
        assert_ne!(tags[1], tags[2]);
    }
}
