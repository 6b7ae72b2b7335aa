//! The backlog: what waited while a user was offline, replayed in order before
//! `backlog_done`, and nothing lost to the race between connecting and sending.

use std::time::Duration;

use chat_tests::{Options, TestEnv};
use serde_json::json;

/// PROTOCOL guarantee 5: 50 messages to an offline user arrive, in send order, before
/// `backlog_done`; live ones follow; once acked, the next connect replays none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_replay_in_order_then_never_again_once_acked() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    let mut sent = Vec::new();
    for i in 0..50 {
        sent.push(
            ca.send_and_confirm(b.id, &format!("c{i}"), &format!("m{i}"))
                .await,
        );
    }

    let mut cb = env.connect(&b).await;
    let (messages, count) = cb.backlog().await;
    assert_eq!(count, 50);
    let bodies: Vec<&str> = messages
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m["msg_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, sent);

    let live = ca.send_and_confirm(b.id, "live", "now live").await;
    assert_eq!(cb.expect_body("now live").await["msg_id"], live);

    let mut all = sent.clone();
    all.push(live);
    cb.send_json(json!({"type": "ack", "msg_ids": all})).await;
    for _ in 0..all.len() {
        let r = ca
            .expect("delivered receipt", |v| {
                v["type"] == "receipt" && v["status"] == "delivered"
            })
            .await;
        assert!(all.iter().any(|id| r["msg_id"] == *id));
    }
    cb.close().await;

    let mut again = env.connect(&b).await;
    let (messages, count) = again.backlog().await;
    assert_eq!((messages.len(), count), (0, 0));
    env.finish().await;
}

/// PROTOCOL guarantee 5, the race: a message sent while the recipient is connecting arrives
/// in the backlog or live, never neither. Repeated 50 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_connecting_are_never_lost() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    for round in 0..50 {
        let body = format!("race {round}");
        let client_id = format!("r{round}");
        let (mut cb, _) = tokio::join!(env.connect(&b), ca.send_msg(b.id, &client_id, &body));
        let id = ca.expect_client_id(&client_id).await["msg_id"].clone();
        let (backlog, _) = cb.backlog().await;
        let got = match backlog.iter().find(|m| m["body"] == body.as_str()) {
            Some(m) => m.clone(),
            None => cb.expect_body(&body).await,
        };
        assert_eq!(got["msg_id"], id, "round {round}");
        cb.send_json(json!({"type": "ack", "msg_ids": [id]})).await;
        ca.expect("delivered receipt", |v| {
            v["type"] == "receipt" && v["msg_id"] == id
        })
        .await;
        cb.close().await;
    }
    env.finish().await;
}

/// Users connecting at the same moment share the gateway's pipeline check (`settle.rs`):
/// each still finds in its backlog what was sent to it just before it connected. The store
/// lets its batches gather for 500 ms here, so the messages are `sent` (in the in stream)
/// long before they are stored: a connect that did not wait for the store would query the
/// backlog without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_connecting_together_each_find_what_was_sent_just_before() {
    const USERS: usize = 20;
    let env = TestEnv::start(Options {
        store_linger: Some(Duration::from_millis(500)),
        ..Options::default()
    })
    .await;
    let sender = env.user("sender").await;
    let mut sending = env.connect(&sender).await;
    sending.backlog().await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(env.user(&format!("together{i}")).await);
    }
    for (i, user) in users.iter().enumerate() {
        let body = format!("for together{i}");
        sending
            .send_and_confirm(user.id, &format!("t{i}"), &body)
            .await;
    }
    let clients = futures::future::join_all(users.iter().map(|u| env.connect(u))).await;
    for (i, mut client) in clients.into_iter().enumerate() {
        let (backlog, _) = client.backlog().await;
        let body = format!("for together{i}");
        assert!(
            backlog.iter().any(|m| m["body"] == body.as_str()),
            "together{i}'s backlog lacks what was sent just before: {backlog:?}"
        );
    }
    env.finish().await;
}
