//! What an operator sees: every service's `/healthz`, `/readyz` (with the state of each
//! backend) and Prometheus `/metrics`, counting what users did.

use chat_tests::TestEnv;
use serde_json::{Value, json};

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_reports_health_readiness_and_metrics() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    let mut cb = env.connect(&b).await;
    ca.backlog().await;
    cb.backlog().await;
    ca.send_and_confirm(b.id, "m1", "hello").await;
    cb.expect_body("hello").await;

    let services = [
        (
            env.base_url(0),
            json!({"nats": "ok", "nats-events": "ok", "jetstream": "ok"}),
        ),
        (env.router_ops_url(0), json!({"nats": "ok", "redis": "ok"})),
        (env.store_ops_url(0), json!({"nats": "ok", "mysql": "ok"})),
    ];
    for (base, checks) in services {
        assert_eq!(get(&format!("{base}/healthz")).await.0, 200, "{base}");
        let (status, body) = get(&format!("{base}/readyz")).await;
        assert_eq!(status, 200, "{base}: {body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), checks);
    }

    // The services share this test's process, so each port renders the same registry.
    chat_tests::eventually("metrics of the message", || async {
        let (_, text) = get(&format!("{}/metrics", env.store_ops_url(0))).await;
        let has = |line: &str| text.lines().any(|l| l.starts_with(line));
        let all = [
            "chat_gateway_connections 2",
            "chat_gateway_event_subscriptions 2",
            "chat_online_users 2",
            "chat_online_sessions 2",
            "chat_gateway_messages_accepted_total 1",
            "chat_gateway_frames_in_total{type=\"send\"} 1",
            "chat_gateway_frames_out_total{type=\"sent\"} 1",
            "chat_delivery_latency_seconds_count 1",
            "chat_router_messages_routed_total{path=\"live\"} 1",
            "chat_store_messages_stored_total 1",
            "chat_db_seconds_count{op=\"write\"}",
            "chat_redis_seconds_count{op=\"sessions\"}",
            "chat_store_rpc_seconds_count{op=\"backlog\"}",
        ]
        .into_iter()
        .all(has);
        all.then_some(())
    })
    .await;

    // Bad frames count by error code.
    ca.send_json(json!({"type": "nonsense"})).await;
    ca.expect_type("error").await;
    chat_tests::eventually("errors by code", || async {
        let (_, text) = get(&format!("{}/metrics", env.base_url(0))).await;
        text.contains("chat_gateway_errors_total{code=\"unknown_type\"} 1")
            .then_some(())
    })
    .await;
    env.finish().await;
}
