//! Trace context crosses every hop: what the router and the store publish for a message
//! carries a `traceparent` of the trace the gateway started for its `send`. (Exporting the
//! spans is another matter; this checks the context that links them.)

use chat_tests::{NATS_URL, TestEnv};
use futures::StreamExt;

fn trace_id(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    let value = headers?.get("traceparent")?.as_str().to_owned();
    // version-traceid-spanid-flags
    let parts: Vec<&str> = value.split('-').collect();
    (parts.len() == 4 && parts[1].len() == 32).then(|| parts[1].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_through_router_and_store() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let nats = async_nats::connect(NATS_URL).await.unwrap();
    let mut events = nats.subscribe(env.subjects.user(b.id)).await.unwrap();
    // A core subscription also sees what the gateway publishes to the in stream.
    let mut inbound = nats.subscribe(env.subjects.inbound()).await.unwrap();
    nats.flush().await.unwrap();
    let mut ca = env.connect(&a).await;
    let mut cb = env.connect(&b).await;
    ca.backlog().await;
    cb.backlog().await;

    let id = ca.send_and_confirm(b.id, "t1", "traced").await;
    // B is online: the router's fast path and the store's stored notice both reach B's subject.
    let mut traces = Vec::new();
    while traces.len() < 2 {
        let event = tokio::time::timeout(chat_tests::WAIT, events.next())
            .await
            .expect("events for B")
            .expect("subscription open");
        let frame: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        if frame["type"] == "message" && frame["msg_id"] == id {
            traces.push(trace_id(event.headers.as_ref()).expect("a traceparent header"));
        }
    }
    let accepted = tokio::time::timeout(chat_tests::WAIT, inbound.next())
        .await
        .expect("the gateway's publish")
        .expect("subscription open");
    let root = trace_id(accepted.headers.as_ref()).expect("the gateway sets traceparent");
    assert_eq!(traces[0], root, "the router continues the gateway's trace");
    assert_eq!(traces[1], root, "the store continues it too");
    assert_ne!(traces[0], "0".repeat(32));
    env.finish().await;
}
