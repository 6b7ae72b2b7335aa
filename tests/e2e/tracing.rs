//! Trace context crosses every hop: what the router and the store publish for a message
//! carries a `traceparent` of the trace the gateway started for its `send`, and the three
//! services, exporting over OTLP, deliver one trace per message.

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

/// The spans a test's OTLP/HTTP receiver got, flattened: (service, trace, span, parent, name).
type Spans = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, String, String)>>>;

/// An OTLP/HTTP (JSON) receiver on a free port: what Jaeger's collector does, in-process.
async fn otlp_receiver() -> (String, Spans) {
    use axum::routing::post;
    let spans: Spans = Default::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let export: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let mut sink = sink.lock().unwrap();
                for rs in export["resourceSpans"].as_array().into_iter().flatten() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
                            sink.push((
                                service.clone(),
                                text("traceId"),
                                text("spanId"),
                                text("parentSpanId"),
                                text("name"),
                            ));
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// The three services, as processes exporting over OTLP: one message makes one trace whose
/// root is the sender's gateway span, with the router's routing span, the store's write
/// span and the recipient's gateway push span as its descendants; a connect's backlog
/// replay, and the recipient's ack, are traces of their own (the connection's span, open
/// for the socket's life, is in the logs only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_exported_trace_across_the_three_services() {
    let (endpoint, spans) = otlp_receiver().await;
    let env = TestEnv::start(chat_tests::Options {
        processes: true,
        process_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        ..Default::default()
    })
    .await;
    let ((_, mut ca), (b, mut cb)) = env.online_pair().await;
    let id = ca.send_and_confirm(b.id, "t1", "traced").await;
    cb.expect_body("traced").await;
    cb.send_json(serde_json::json!({"type": "ack", "msg_ids": [id]}))
        .await;
    ca.expect(&format!("receipt for {id}"), |v| {
        v["type"] == "receipt" && v["msg_id"] == id
    })
    .await;

    let wanted = [
        ("chat-router", "router.route"),
        ("chat-store", "store.persist"),
        ("chat-gateway", "gateway.push"),
    ];
    let (root, tree) = chat_tests::eventually("one trace with spans of all three", || async {
        let spans = spans.lock().unwrap().clone();
        let root = spans
            .iter()
            .find(|s| s.0 == "chat-gateway" && s.4 == "gateway.send" && s.3.is_empty())?;
        let tree: Vec<_> = spans.iter().filter(|s| s.1 == root.1).cloned().collect();
        wanted
            .iter()
            .all(|(service, name)| tree.iter().any(|s| s.0 == *service && s.4 == *name))
            .then(|| (root.clone(), tree))
    })
    .await;
    // Every span of the trace descends from the gateway's send span.
    let by_id: std::collections::HashMap<&str, &str> =
        tree.iter().map(|s| (s.2.as_str(), s.3.as_str())).collect();
    for s in &tree {
        let mut at = s.2.as_str();
        let mut hops = 0;
        while at != root.2 {
            at = by_id
                .get(at)
                .copied()
                .unwrap_or_else(|| panic!("{s:?} does not lead back to the root"));
            hops += 1;
            assert!(hops < 50, "a cycle at {s:?}");
        }
    }
    let services: std::collections::BTreeSet<&str> = tree.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["chat-gateway", "chat-router", "chat-store"]
    );
    // Each connect's backlog replay, each HTTP request (register, login) and each ack is a
    // trace of its own, holding the store's work for it.
    for (root_name, child) in [
        ("gateway.backlog", "store.rpc"),
        ("request", "store.rpc"),
        ("gateway.ack", "store.delivered"),
    ] {
        chat_tests::eventually(&format!("{root_name} traced"), || async {
            let spans = spans.lock().unwrap().clone();
            spans
                .iter()
                .filter(|s| s.0 == "chat-gateway" && s.4 == root_name && s.3.is_empty())
                .any(|r| {
                    spans
                        .iter()
                        .any(|s| s.0 == "chat-store" && s.4 == child && s.3 == r.2)
                })
                .then_some(())
        })
        .await;
    }
    eprintln!("trace {} of message {id}:", root.1);
    for s in &tree {
        eprintln!("  {} {} (span {}, parent {})", s.0, s.4, s.2, s.3);
    }
    env.finish().await;
}
