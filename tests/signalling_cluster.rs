//! Two Switchboard instances (two `switchboard serve` processes) on
//! one PostgreSQL and one Redis, with a real Synapse: a signal for a
//! peer connected to the other instance crosses through Redis and is `delivered` over the relay;
//! with Redis stopped, it goes through Matrix instead (counted), and the peer's instance still
//! hands it to the peer's socket from the shared inbox. A call across the instances is followed by
//! both brokers and counted once.

mod common;

use std::time::Duration;

use common::ws::Socket;
use serde_json::json;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";

#[tokio::test]
async fn a_signal_crosses_instances_through_redis_and_through_matrix_when_redis_is_down() {
    let Some(database) = common::fresh_postgres().await else { return };
    let Some(mut redis) = common::Redis::start().await else { return };
    let in_cluster = |toml: &str, instance: &str| {
        toml.replace(
            "[database]\n",
            &format!(
                "[cluster]\nredis_url = \"{}\"\n[database]\ninstance_name = \"{instance}\"\n",
                redis.url()
            ),
        )
    };
    // Two `switchboard serve` processes: a is the one registered with Synapse; b shares its
    // database and Redis.
    let dir_a = tempfile::tempdir().unwrap();
    let Some((synapse, mut a)) =
        common::synapse_and_process(dir_a.path(), &database, |toml| in_cluster(&toml, "a")).await
    else {
        return;
    };
    a.wait_for("/health").await;
    let dir_b = tempfile::tempdir().unwrap();
    let toml_b = common::config_toml(&database, &synapse.base_url, common::ANY_PORTS);
    let mut b = common::Process::start(dir_b.path(), &in_cluster(&toml_b, "b"), common::ANY_PORTS);
    b.wait_for("/health").await;
    let client_of = |process: &common::Process| -> std::net::SocketAddr {
        format!("127.0.0.1:{}", process.ports[1]).parse().unwrap()
    };
    let metrics_of = |process: &common::Process| {
        let url = format!("http://127.0.0.1:{}/metrics", process.ports[2]);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };

    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let (mut on_a, _) = Socket::ready(client_of(&a), &alice.user.access_token).await;
    let (mut on_b, _) = Socket::ready(client_of(&b), &bob.user.access_token).await;

    let invite = |id: u64, call_id: &str| {
        json!({
            "type": "signal", "id": id, "to": &bob.user.user_id, "call_id": call_id,
            "event_type": "m.call.invite",
            "content": { "party_id": "p", "version": "1", "lifetime": 60000, "offer": { "type": "offer", "sdp": "v=0" } },
        })
    };
    on_a.send(&invite(1, "across-1")).await;
    assert_eq!(on_a.next_of("delivered").await, json!({ "type": "delivered", "ref": 1, "via": "relay" }));
    let got = on_b.next_of("signal").await;
    assert_eq!((got["call_id"].as_str(), got["via"].as_str()), (Some("across-1"), Some("relay")));
    assert_eq!(got["from"], alice.user.user_id.as_str());

    // The call goes on across the instances: bob's answer crosses back, both report their channel
    // open, and both brokers see the call established; a (the caller's instance) counts it.
    on_b.send(&json!({
        "type": "signal", "id": 10, "to": &alice.user.user_id, "call_id": "across-1",
        "event_type": "m.call.answer",
        "content": { "party_id": "q", "version": "1", "answer": { "type": "answer", "sdp": "v=0" } },
    }))
    .await;
    assert_eq!(on_b.next_of("delivered").await, json!({ "type": "delivered", "ref": 10, "via": "relay" }));
    assert_eq!(on_a.next_of("signal").await["event_type"], "m.call.answer");
    on_a.send(&json!({ "type": "connected", "id": 11, "call_id": "across-1" })).await;
    on_b.send(&json!({ "type": "connected", "id": 12, "call_id": "across-1" })).await;
    assert_eq!(on_a.next_of("ok").await["ref"], 11);
    assert_eq!(on_b.next_of("ok").await["ref"], 12);
    common::eventually(Duration::from_secs(10), "both brokers to see the call established", || async {
        let (on_a, on_b) = (metrics_of(&a).await, metrics_of(&b).await);
        let established = |m: &str| common::metric(m, "switchboard_calls_established ");
        let live = |m: &str| common::metric(m, "switchboard_calls_live ");
        (established(&on_a) == 1 && established(&on_b) == 1 && live(&on_a) == 0 && live(&on_b) == 0)
            .then_some(())
    })
    .await;
    let (metrics_a, metrics_b) = (metrics_of(&a).await, metrics_of(&b).await);
    for (metrics, counted) in [(&metrics_a, 1), (&metrics_b, 0)] {
        assert_eq!(common::metric(metrics, "switchboard_calls_started_total"), counted, "{metrics}");
        assert_eq!(common::metric(metrics, "switchboard_calls_connected_total"), counted, "{metrics}");
        assert_eq!(common::metric(metrics, "switchboard_calls_upgrade_seconds_count"), counted, "{metrics}");
    }

    // Redis gone: the signal goes through Matrix; b finds it in the shared inbox (its poll) and
    // hands it to bob's socket.
    redis.stop();
    common::eventually(Duration::from_secs(10), "instance a to see Redis gone", || async {
        (common::metric(&metrics_of(&a).await, "switchboard_cluster_up ") == 0).then_some(())
    })
    .await;
    on_a.send(&invite(2, "across-2")).await;
    assert_eq!(on_a.next_of("delivered").await, json!({ "type": "delivered", "ref": 2, "via": "matrix" }));
    let got = on_b.next_of("signal").await;
    assert_eq!((got["call_id"].as_str(), got["via"].as_str()), (Some("across-2"), Some("matrix")));
    let metrics = metrics_of(&a).await;
    assert_eq!(common::metric(&metrics, "switchboard_signalling_cluster_fallbacks_total"), 1);
    // Exactly once: nothing else arrives before the answer to a ping.
    on_b.send(&json!({ "type": "ping", "id": "p" })).await;
    assert_eq!(on_b.next().await.unwrap(), json!({ "type": "pong", "ref": "p" }));
    assert_eq!(b.terminate().await.code(), Some(0));
    assert_eq!(a.terminate().await.code(), Some(0));
}
