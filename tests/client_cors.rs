//! CORS on the client API: a browser page on an allowed origin may call it (preflight and simple
//! requests get the headers); other origins get none.

mod common;

#[tokio::test]
async fn allowed_origins_get_cors_headers_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    config.client.cors_allowed_origins = vec!["https://app.example.org".to_owned()];
    let running = common::start(config).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/_switchboard/client/v1/turn", running.client);
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, &url)
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization")
            .send()
    };
    let allowed = preflight("https://app.example.org").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], "https://app.example.org");
    assert!(headers["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let versions = format!("http://{}/_switchboard/client/versions", running.client);
    let simple = client.get(&versions).header("Origin", "https://app.example.org").send().await.unwrap();
    assert_eq!(simple.headers()["access-control-allow-origin"], "https://app.example.org");
    running.stop().await.unwrap();
}
