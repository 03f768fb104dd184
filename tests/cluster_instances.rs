//! Instances of one deployment sharing one PostgreSQL and one Redis: what one instance learns, every
//! instance's directory sees at once. The instances' clocks are manual and not stepped (but where
//! a test says so), so their 1 s inbox poll never fires: only Redis can carry it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::clock::Clock;
use switchboard::cluster::Cluster;
use switchboard::config::{Config, Secret};
use switchboard::directory::service::{DirectoryService, Settings};
use switchboard::homeserver::HomeserverClient;
use switchboard::store::Store;
use switchboard::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

/// The eth-account example key's user on "localhost" and its `personal_sign` of that user id.
const USER: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:localhost";
const ADDRESS: &str = "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23";
const SIGNATURE: &str = "0xb0e955ff35d78250fcd1518aaffdf801964decc705ceba5efd205f5eea30e781\
                         6a6d0813ff5745c18c61350d6d747331d47d208f9b9ed5129e87c9bb05c0928e1b";
const OTHER: &str = "@0x0000000000000000000000000000000000000001:localhost";
const T0: i64 = 1_800_000_000_000;
const WAIT: Duration = Duration::from_secs(10);

fn config(database_url: &str, redis: &common::Redis, instance: &str) -> Config {
    let mut config = common::config(database_url, "http://127.0.0.1:9");
    instance.clone_into(&mut config.database.instance_name);
    config.cluster.redis_url = Some(Secret::new(redis.url()));
    // No homeserver here: the directory learns only from the inbox and connections.
    config.directory.lookups_per_sec = 0;
    config.directory.anonymous_read = true;
    config
}

async fn put(running: &common::Running, txn: &str, body: &Value) {
    let url = running.appservice_url(&format!("/_matrix/app/v1/transactions/{txn}"));
    let response =
        reqwest::Client::new().put(&url).bearer_auth(common::HS_TOKEN).json(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

fn joined() -> Value {
    json!({ "events": [{
        "type": "m.room.member", "sender": USER, "state_key": USER, "room_id": "!r:localhost",
        "event_id": "$join", "origin_server_ts": 1,
        "content": { "membership": "join", "displayname": SIGNATURE, "avatar_url": "mxc://raiden.network/cap?webRTC=1" },
    }]})
}

fn presence(state: &str) -> Value {
    json!({ "ephemeral": [{ "type": "m.presence", "sender": USER, "content": { "presence": state } }] })
}

/// The user's presence as instance `running`'s discovery API tells it (`None`: not known there).
async fn presence_on(running: &common::Running) -> Option<String> {
    let url = format!("http://{}/_switchboard/client/v1/peers/{ADDRESS}", running.client);
    let peer: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    peer["users"][0]["presence"].as_str().map(str::to_owned)
}

async fn until_presence(running: &common::Running, state: &str, what: &str) {
    common::eventually(WAIT, what, || async {
        (presence_on(running).await.as_deref() == Some(state)).then_some(())
    })
    .await;
}

/// Waits until `running` is connected to Redis and subscribed to its channels (the inbox wake and
/// connections).
async fn until_in_cluster(running: &common::Running) {
    common::eventually(WAIT, "the instance subscribed in Redis", || async {
        let metrics = running.metrics().await;
        (common::metric(&metrics, "switchboard_cluster_up ") == 1
            && common::metric(&metrics, "switchboard_cluster_channels ") >= 2)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_transaction_taken_by_one_instance_reaches_the_others_directory_without_its_poll() {
    let Some(mut redis) = common::Redis::start().await else { return };
    let Some(database) = common::fresh_postgres().await else { return };
    let (clock_a, clock_b) = (Clock::manual(T0), Clock::manual(T0));
    let a = common::start_with_clock(config(&database, &redis, "a"), clock_a.clone()).await;
    let b = common::start_with_clock(config(&database, &redis, "b"), clock_b.clone()).await;
    until_in_cluster(&a).await;
    until_in_cluster(&b).await;

    put(&a, "1", &joined()).await;
    put(&a, "2", &presence("online")).await;
    until_presence(&b, "online", "b to see the presence a stored").await;
    // a applies what it stored through its own inbox consumer, which may come after b's wake
    // through Redis (seen once under load: a still said "offline" when b said "online").
    until_presence(&a, "online", "a to apply the presence it stored").await;

    // Without Redis, b's poll is the safety net: b sees the change once its clock passes a poll.
    redis.stop();
    common::eventually(WAIT, "a to see Redis gone", || async {
        (common::metric(&a.metrics().await, "switchboard_cluster_up ") == 0).then_some(())
    })
    .await;
    clock_a.advance(Duration::from_secs(1)); // received after the first push
    put(&a, "3", &presence("offline")).await;
    until_presence(&a, "offline", "a to apply its own transaction").await;
    common::eventually(WAIT, "b's poll to find the transaction", || async {
        clock_b.advance(Duration::from_secs(1));
        (presence_on(&b).await.as_deref() == Some("offline")).then_some(())
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// An instance's directory and the cluster around it, as `run` builds them, but in the test's
/// hands: its connections are the test's calls to `connected`.
struct Bare {
    directory: Arc<DirectoryService>,
    /// Stops sharing (the instance says it is gone), then the cluster.
    stop_sharing: CancellationToken,
    stop_cluster: CancellationToken,
    sharing: tokio::task::JoinHandle<()>,
}

async fn bare(config: &Config) -> Bare {
    let store = Arc::new(Store::connect(config.database_url(), 2).await.unwrap());
    let metrics = Arc::new(Metrics::new());
    let homeserver = Arc::new(HomeserverClient::new(config, metrics.clone()).unwrap());
    let clock = Clock::manual(T0);
    let directory = DirectoryService::load(
        store,
        homeserver,
        metrics.clone(),
        Settings::from_config(config),
        clock.clone(),
    )
    .await
    .unwrap();
    let stop_cluster = CancellationToken::new();
    let (cluster, connecting) = Cluster::from_config(config, metrics.clone(), stop_cluster.clone());
    tokio::spawn(connecting.expect("a Redis cluster"));
    let stop_sharing = CancellationToken::new();
    let sharing = tokio::spawn(switchboard::cluster::connections::share(
        directory.clone(),
        cluster,
        switchboard::cluster::connections::Settings::from_config(config),
        metrics,
        clock,
        stop_sharing.clone(),
    ));
    Bare { directory, stop_sharing, stop_cluster, sharing }
}

#[tokio::test]
async fn a_user_connected_to_one_instance_is_online_on_the_others_until_it_leaves() {
    let Some(redis) = common::Redis::start().await else { return };
    let Some(database) = common::fresh_postgres().await else { return };
    let b = common::start_with_clock(config(&database, &redis, "b"), Clock::manual(T0)).await;
    until_in_cluster(&b).await;
    put(&b, "1", &joined()).await;
    until_presence(&b, "offline", "b to know the user").await;

    let a = bare(&config(&database, &redis, "a")).await;
    let connection = a.directory.connected(USER).expect("a Raiden user");
    until_presence(&b, "online", "the user connected to a to be online on b").await;
    drop(connection);
    until_presence(&b, "offline", "the user to be offline on b once a's connection closed").await;

    // Two connections: online until the last closes.
    let first = a.directory.connected(USER).unwrap();
    let second = a.directory.connected(USER).unwrap();
    until_presence(&b, "online", "online again").await;
    drop(first);
    // A later connection's announcement has reached b, so whatever the first one's closing
    // caused has too (a's messages arrive in order): the user is still online.
    let _other = a.directory.connected(OTHER).unwrap();
    common::eventually(WAIT, "b to count both users of a", || async {
        (common::metric(&b.metrics().await, "switchboard_cluster_remote_users ") == 2).then_some(())
    })
    .await;
    assert_eq!(presence_on(&b).await.as_deref(), Some("online"));

    // An instance that stops takes its users with it.
    a.stop_sharing.cancel();
    tokio::time::timeout(WAIT, a.sharing).await.expect("sharing stops").unwrap();
    a.stop_cluster.cancel();
    until_presence(&b, "offline", "the users of a stopped instance to be offline").await;
    drop(second);
    b.stop().await.unwrap();
}

#[tokio::test]
async fn the_users_of_an_instance_silent_for_three_snapshot_periods_are_dropped() {
    let Some(redis) = common::Redis::start().await else { return };
    let Some(database) = common::fresh_postgres().await else { return };
    let clock_b = Clock::manual(T0);
    let b = common::start_with_clock(config(&database, &redis, "b"), clock_b.clone()).await;
    until_in_cluster(&b).await;
    put(&b, "1", &joined()).await;
    until_presence(&b, "offline", "b to know the user").await;
    let a = bare(&config(&database, &redis, "a")).await;
    let _connection = a.directory.connected(USER).unwrap();
    until_presence(&b, "online", "the user connected to a to be online on b").await;

    // a dies without a word (no `gone`): b holds its users for three periods of 10 s, then drops them.
    a.sharing.abort();
    a.stop_cluster.cancel();
    clock_b.advance(Duration::from_secs(25));
    let metrics = b.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_cluster_remote_users "), 1, "{metrics}");
    assert_eq!(presence_on(&b).await.as_deref(), Some("online"));
    common::eventually(WAIT, "b to drop the silent instance's users", || async {
        clock_b.advance(Duration::from_secs(1));
        (presence_on(&b).await.as_deref() == Some("offline")).then_some(())
    })
    .await;
    let metrics = b.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_cluster_remote_instances "), 0, "{metrics}");
    b.stop().await.unwrap();
}
