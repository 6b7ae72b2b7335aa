//! Bad input: every socket error code from a real bad frame, the connection usable after;
//! `from` ignored; text that breaks naive code round-trips byte for byte; 401 and 1009.

use chat_tests::{Options, TestEnv};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_answers_and_the_connection_goes_on() {
    let env = TestEnv::start(Options {
        send_rate: 1,
        send_burst: 3,
        ..Options::default()
    })
    .await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    ca.backlog().await;

    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("this is not json".into(), "bad_request", None),
        (json!(["an", "array"]).to_string(), "bad_request", None),
        (json!({"type": "shout"}).to_string(), "unknown_type", None),
        (
            json!({"type": "send", "client_id": "x1", "to": b.id}).to_string(),
            "bad_request",
            Some("x1"),
        ),
        (
            json!({"type": "send", "client_id": "x2", "to": "bob", "body": "hi"}).to_string(),
            "bad_request",
            Some("x2"),
        ),
        (
            json!({"type": "send", "client_id": "x3", "to": b.id, "body": ""}).to_string(),
            "empty_body",
            Some("x3"),
        ),
        (
            json!({"type": "send", "client_id": "x4", "to": b.id, "body": "é".repeat(4097)})
                .to_string(),
            "body_too_long",
            Some("x4"),
        ),
        (
            json!({"type": "send", "client_id": "x5", "to": 987_654_321, "body": "hi"}).to_string(),
            "unknown_recipient",
            Some("x5"),
        ),
        (
            json!({"type": "ack", "msg_ids": []}).to_string(),
            "bad_request",
            None,
        ),
        (
            json!({"type": "read", "peer": b.id, "up_to": "not-an-id"}).to_string(),
            "bad_request",
            None,
        ),
    ];
    for (frame, code, client_id) in cases {
        ca.send_text(&frame).await;
        let e = ca.expect_error(code).await;
        assert_eq!(e["client_id"].as_str(), client_id, "{frame}: {e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
        ca.send_json(json!({"type": "ping"})).await;
        ca.expect_type("pong").await;
    }
    ca.send_raw(WsMessage::Binary(vec![1, 2, 3].into())).await;
    ca.expect_error("bad_request").await;

    // The rate limit (1/s, burst 3 here): a burst of 10 gets some `rate_limited`, each with
    // its client_id, and the connection stays.
    for i in 0..10 {
        ca.send_msg(b.id, &format!("burst{i}"), "burst").await;
    }
    let mut limited = 0;
    for i in 0..10 {
        let answer = ca.expect_client_id(&format!("burst{i}")).await;
        if answer["type"] == "error" {
            assert_eq!(answer["code"], "rate_limited");
            limited += 1;
        }
    }
    assert!(limited >= 6, "only {limited} of 10 limited");
    ca.send_json(json!({"type": "ping"})).await;
    ca.expect_type("pong").await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_is_the_authenticated_user_and_text_round_trips_exactly() {
    let env = TestEnv::start_default().await;
    let (a, b, mallory) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("mallory").await,
    );
    let mut cm = env.connect(&mallory).await;
    cm.backlog().await;
    cm.send_json(json!({"type": "send", "client_id": "spoof", "to": b.id, "from": a.id, "body": "from whom?"}))
        .await;
    assert_eq!(cm.expect_client_id("spoof").await["type"], "sent");

    let bodies = [
        "emoji 😀👍🏽👨‍👩‍👧",
        "中文，日本語、한국어",
        r#"quotes " ' ` and \ backslash"#,
        "'; DROP TABLE messages; --",
        "<img src=x onerror=alert(1)>",
        "tab\tnew\nline\r\n and nul \u{0}",
        "   padded   ",
    ];
    // Backlog: B is offline.
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    for (i, body) in bodies.iter().enumerate() {
        ca.send_and_confirm(b.id, &format!("off{i}"), body).await;
    }
    let mut cb = env.connect(&b).await;
    let (backlog, _) = cb.backlog().await;
    let spoofed = backlog
        .iter()
        .find(|m| m["body"] == "from whom?")
        .expect("the spoofed message");
    assert_eq!(spoofed["from"], mallory.id, "`from` in a frame is ignored");
    let replayed: Vec<&str> = backlog
        .iter()
        .filter(|m| m["from"] == a.id)
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(replayed, bodies);
    // Live.
    for (i, body) in bodies.iter().enumerate() {
        ca.send_and_confirm(b.id, &format!("on{i}"), body).await;
        assert_eq!(cb.expect_type("message").await["body"], *body);
    }
    // History (the live copies may reach B before the store commits them).
    let path = format!("/api/v1/conversations/{}/messages", a.id);
    let stored: Vec<String> = chat_tests::eventually("all stored", || async {
        let (_, page) = env.get(&b, &path).await;
        let messages = page["messages"].as_array()?;
        (messages.len() == 2 * bodies.len()).then(|| {
            messages
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_owned())
                .collect()
        })
    })
    .await;
    let twice: Vec<&str> = bodies.iter().chain(bodies.iter()).copied().collect();
    assert_eq!(stored, twice);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_needs_a_valid_token_and_big_frames_close_with_1009() {
    let env = TestEnv::start_default().await;
    let a = env.user("alice").await;
    let url = env.ws_url(0);
    let expired = {
        let now = chat_proto::now_ms() / 1000;
        let claims = json!({"sub": a.id.to_string(), "iat": now - 120, "exp": now - 60});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(env.jwt_secret.as_bytes()),
        )
        .unwrap()
    };
    let forged = {
        let claims = json!({"sub": a.id.to_string(), "exp": chat_proto::now_ms() / 1000 + 600});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"guess"),
        )
        .unwrap()
    };
    for attempt in [
        url.clone(),
        format!("{url}?token=garbage"),
        format!("{url}?token={expired}"),
        format!("{url}?token={forged}"),
    ] {
        match tokio_tungstenite::connect_async(attempt.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 401, "{attempt}")
            }
            other => panic!("{attempt}: expected 401, got {:?}", other.map(|_| ())),
        }
    }
    // The browser form works.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={}", a.token))
        .await
        .unwrap();
    use futures::StreamExt;
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"hello\""));
    drop(ws);

    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    ca.send_text(&"x".repeat(64 * 1024 + 1)).await;
    assert_eq!(ca.expect_close().await, Some(1009));
    env.finish().await;
}

/// A token that expires while its socket is open closes the socket with the documented code
/// (4001); the client logs in again and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closes_when_its_token_expires() {
    let env = TestEnv::start_default().await;
    let mut a = env.user("alice").await;
    let now = chat_proto::now_ms() / 1000;
    let claims = json!({"sub": a.id.to_string(), "iat": now, "exp": now + 2});
    a.token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(env.jwt_secret.as_bytes()),
    )
    .unwrap();
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    assert_eq!(ca.expect_close().await, Some(chat_gateway::TOKEN_EXPIRED));
    env.finish().await;
}
