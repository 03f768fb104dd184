//! The browser client (`clients/browser/switchboard.js`): Switchboard serves it with caching and
//! CORS headers, and a real Chromium (driven by playwright-core, `tests/browser/drive.mjs`) loads it
//! from Switchboard's origin and talks to the Rust client through Matrix and the TURN relay.

mod common;

use std::time::Duration;

const FILES: [(&str, &str); 3] = [
    ("switchboard.js", "text/javascript; charset=utf-8"),
    ("switchboard.d.ts", "application/typescript; charset=utf-8"),
    ("demo.html", "text/html; charset=utf-8"),
];

#[tokio::test]
async fn client_files_are_served_with_caching_and_cors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    // The API's own CORS list must not narrow the public files' `*`.
    config.client.cors_allowed_origins = vec!["https://app.example.org".to_owned()];
    let running = common::start(config).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for (name, content_type) in FILES {
        let url = format!("http://{}/_switchboard/client/v1/{name}", running.client);
        let first = client.get(&url).header("Origin", "https://other.example").send().await.unwrap();
        assert_eq!(first.status(), 200, "{name}");
        let headers = first.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{name}");
        assert_eq!(headers["access-control-allow-origin"], "*", "{name}");
        assert_eq!(headers["cache-control"], "public, max-age=300, must-revalidate", "{name}");
        let etag = headers["etag"].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{name}: a strong ETag {etag}");
        let body = first.bytes().await.unwrap();
        let on_disk = std::fs::read(common::repo_root().join("clients/browser").join(name)).unwrap();
        assert_eq!(body.as_ref(), on_disk.as_slice(), "{name}: the embedded file");

        let again = client.get(&url).header("If-None-Match", &etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{name}");
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert_eq!(again.headers()["access-control-allow-origin"], "*");
        assert!(again.bytes().await.unwrap().is_empty(), "{name}: 304 has no body");

        let listed =
            client.get(&url).header("If-None-Match", format!("\"x\", W/{etag}")).send().await.unwrap();
        assert_eq!(listed.status(), 304, "{name}: a tag in a list (weak comparison)");
        let stale = client.get(&url).header("If-None-Match", "\"stale\"").send().await.unwrap();
        assert_eq!(stale.status(), 200, "{name}: another tag gets the file");
    }
    let api = format!("http://{}/_switchboard/client/versions", running.client);
    let api = client.get(&api).header("Origin", "https://other.example").send().await.unwrap();
    assert!(api.headers().get("access-control-allow-origin").is_none(), "the API keeps its own CORS");
    running.stop().await.unwrap();
}
