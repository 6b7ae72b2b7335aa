//! Live delivery, receipts, retries and several devices.

use chat_tests::{Options, TestEnv};
use futures::{FutureExt, StreamExt};
use serde_json::json;

/// PROTOCOL guarantee: `sent` means accepted; the recipient gets `message`; its `ack` gives
/// the sender `receipt delivered`, its `read` gives `receipt read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_message_is_delivered_then_receipted() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    let mut cb = env.connect(&b).await;
    assert_eq!(ca.backlog().await.1, 0);
    assert_eq!(cb.backlog().await.1, 0);
    assert_eq!(cb.hello["user_id"], b.id);

    let id = ca.send_and_confirm(b.id, "c-1", "hello bob").await;
    let m = cb.expect_body("hello bob").await;
    assert_eq!(m["msg_id"], id);
    assert_eq!(m["from"], a.id);
    assert_eq!(m["to"], b.id);
    assert_eq!(m["client_id"], "c-1");
    assert_eq!(m["status"], "sent");
    assert!(m["ts"].as_i64().unwrap() > 0);

    cb.send_json(json!({"type": "ack", "msg_ids": [id]})).await;
    let r = ca.expect_type("receipt").await;
    assert_eq!(
        r,
        json!({"type": "receipt", "msg_id": id, "peer": b.id, "status": "delivered"})
    );

    cb.send_json(json!({"type": "read", "peer": a.id, "up_to": id}))
        .await;
    let r = ca.expect_type("receipt").await;
    assert_eq!(
        r,
        json!({"type": "receipt", "msg_id": id, "peer": b.id, "status": "read"})
    );

    let (status, page) = env
        .get(&a, &format!("/api/v1/conversations/{}/messages", b.id))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["status"], "read");
    env.finish().await;
}

/// PROTOCOL guarantee 3: a retried `send` with the same client_id answers the first msg_id
/// and makes no second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_client_id_returns_the_first_message() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    let first = ca.send_and_confirm(b.id, "same", "only once").await;
    // Retried at once (still in the in stream, or just routed) ...
    let again = ca.send_and_confirm(b.id, "same", "only once").await;
    assert_eq!(first, again);
    // ... and from another connection, after the first has surely been stored.
    chat_tests::eventually("first message stored", || async {
        let (_, page) = env
            .get(&a, &format!("/api/v1/conversations/{}/messages", b.id))
            .await;
        (page["messages"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let mut ca2 = env.connect(&a).await;
    let third = ca2.send_and_confirm(b.id, "same", "only once").await;
    assert_eq!(first, third);

    let mut cb = env.connect(&b).await;
    let (messages, count) = cb.backlog().await;
    assert_eq!(count, 1, "one message, not three: {messages:?}");
    assert_eq!(messages[0]["msg_id"], first);
    let (_, page) = env
        .get(&b, &format!("/api/v1/conversations/{}/messages", a.id))
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    env.finish().await;
}

/// A sender with one device is not sent its own message back: the router saw that device
/// alone, so it pushes no copy, and the store's "stored" notice goes to the recipient only
/// (one NATS message and one de-dup per message less). Watched on one wildcard subscription
/// until the store's notice of the second message and the router has acked both (it pushes
/// before it acks, on one connection), then a flush: any copy has arrived by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_only_device_gets_no_stored_notice_of_its_own_messages() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let nats = async_nats::connect(chat_tests::NATS_URL).await.unwrap();
    let users = format!("{}.user.*", env.subjects.namespace());
    let mut events = nats.subscribe(users).await.unwrap();
    nats.flush().await.unwrap();
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    // Bob is offline: the only message event on his subject is the store's notice.
    ca.send_and_confirm(b.id, "n-1", "first").await;
    let second = ca.send_and_confirm(b.id, "n-2", "second").await;
    let (alice, bob) = (env.subjects.user(a.id), env.subjects.user(b.id));
    let mut own = 0;
    loop {
        let event = tokio::time::timeout(chat_tests::WAIT, events.next())
            .await
            .expect("the store's notice to bob")
            .unwrap();
        let frame: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        if frame["type"] != "message" {
            continue;
        }
        if event.subject.as_str() == alice {
            own += 1;
        }
        if event.subject.as_str() == bob && frame["msg_id"] == second.as_str() {
            break;
        }
    }
    let js = async_nats::jetstream::new(nats.clone());
    chat_tests::eventually("the router acked both messages", || async {
        let stream = js.get_stream(env.subjects.in_stream()).await.ok()?;
        let router = stream
            .consumer_info(env.subjects.router_consumer())
            .await
            .ok()?;
        (router.ack_floor.stream_sequence >= 2).then_some(())
    })
    .await;
    nats.flush().await.unwrap();
    while let Some(Some(event)) = events.next().now_or_never() {
        let frame: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        if frame["type"] == "message" && event.subject.as_str() == alice {
            own += 1;
        }
    }
    assert_eq!(own, 0, "alice's only device was sent her own messages");
    env.finish().await;
}

/// When presence has lost the sender's sessions (as after Redis restarted empty, until the
/// next heartbeat), the router cannot know about the sender's other devices, so it sends the
/// copy anyway and NATS interest decides who gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_senders_other_device_gets_its_copy_when_presence_lost_the_sessions() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut a1 = env.connect(&a).await;
    let mut a2 = env.connect(&a).await;
    a1.backlog().await;
    a2.backlog().await;
    let redis = redis::Client::open(env.redis_url()).unwrap();
    let mut con = redis.get_multiplexed_async_connection().await.unwrap();
    let sessions = format!("{}sessions:{}", env.subjects.redis_prefix(), a.id);
    let _: () = redis::cmd("DEL")
        .arg(&sessions)
        .query_async(&mut con)
        .await
        .unwrap();
    let id = a1
        .send_and_confirm(b.id, "p-1", "while presence forgot me")
        .await;
    assert_eq!(
        a2.expect_body("while presence forgot me").await["msg_id"],
        id
    );
    env.finish().await;
}

/// PROTOCOL guarantee 2: every connected device of the recipient gets the message, and the
/// sender's other devices get a copy of what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_gets_the_message_and_the_senders_other_device_a_copy() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut a1 = env.connect(&a).await;
    let mut a2 = env.connect(&a).await;
    let mut b1 = env.connect(&b).await;
    let mut b2 = env.connect(&b).await;
    for c in [&mut a1, &mut a2, &mut b1, &mut b2] {
        c.backlog().await;
    }
    let id = a1.send_and_confirm(b.id, "d-1", "to both phones").await;
    for c in [&mut b1, &mut b2, &mut a2] {
        let m = c.expect_body("to both phones").await;
        assert_eq!(m["msg_id"], id);
        assert_eq!(m["from"], a.id);
    }
    // A reply from one of B's devices reaches both of A's.
    let reply = b2.send_and_confirm(a.id, "d-2", "got it").await;
    for c in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(c.expect_body("got it").await["msg_id"], reply);
    }
    env.finish().await;
}

/// The router keeps session counts cached (Redis pushes an invalidation when one changes): a
/// sender known to have one device, who then connects a second, gets the copy of the next
/// message on the second device, not only in its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_device_connected_after_it_sent_gets_the_copies_from_then_on() {
    let env = TestEnv::start_default().await;
    let ((a, mut a1), (b, mut b1)) = env.online_pair().await;
    // The router has now looked up (and cached) one session for alice.
    a1.send_and_confirm(b.id, "c-1", "from one device").await;
    b1.expect_body("from one device").await;
    let mut a2 = env.connect(&a).await;
    a2.backlog().await;
    let id = a1.send_and_confirm(b.id, "c-2", "now from two").await;
    assert_eq!(a2.expect_body("now from two").await["msg_id"], id);
    assert_eq!(b1.expect_body("now from two").await["msg_id"], id);
    env.finish().await;
}

/// The store takes messages from the in stream itself (its stream sources it), so with no
/// router running at all a message is still stored and reaches its online recipient by the
/// store's notice, and the recipient's `ack` still comes back to the sender as a receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_router_messages_are_stored_and_delivered_by_the_store() {
    let env = TestEnv::start(Options {
        routers: 0,
        ..Default::default()
    })
    .await;
    let ((a, mut ca), (b, mut cb)) = env.online_pair().await;
    let id = ca.send_and_confirm(b.id, "nr-1", "no router here").await;
    assert_eq!(cb.expect_body("no router here").await["msg_id"], id);
    cb.send_json(json!({"type": "ack", "msg_ids": [id]})).await;
    let r = ca.expect_type("receipt").await;
    assert_eq!(r["msg_id"], id);
    assert_eq!(r["status"], "delivered");
    let (status, page) = env
        .get(&b, &format!("/api/v1/conversations/{}/messages", a.id))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["msg_id"], id);
    env.finish().await;
}

/// A retry that comes after JetStream's de-dup window (put into the in stream by hand, under a
/// fresh msg_id, as a gateway publishes it then) is not written again, and the store sends no
/// "stored" notice of it: the recipient's device is not given a second copy. Without a router
/// the store's notices are the only message events, and the store takes the stream in order:
/// by the notice of the message sent after the retry, one of the retry would have come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_dedup_window_is_neither_stored_nor_announced() {
    let env = TestEnv::start(Options {
        routers: 0,
        ..Default::default()
    })
    .await;
    let ((a, mut ca), (b, mut cb)) = env.online_pair().await;
    let first = ca.send_and_confirm(b.id, "late-1", "first try").await;
    assert_eq!(cb.expect_body("first try").await["msg_id"], first);
    let retry = chat_proto::Message {
        msg_id: uuid::Uuid::now_v7().to_string(),
        from: a.id,
        to: b.id,
        body: "first try".into(),
        ts: chat_proto::now_ms(),
        client_id: "late-1".into(),
        status: chat_proto::Status::Sent,
    };
    let js = async_nats::jetstream::new(async_nats::connect(chat_tests::NATS_URL).await.unwrap());
    js.publish(
        env.subjects.inbound(),
        serde_json::to_vec(&retry).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ca.send_and_confirm(b.id, "late-2", "after the retry").await;
    let next = cb.expect_type("message").await;
    assert_eq!(
        next["body"], "after the retry",
        "a second copy came: {next}"
    );
    let (status, page) = env
        .get(&b, &format!("/api/v1/conversations/{}/messages", a.id))
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["msg_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "stored: {ids:?}");
    assert!(ids.contains(&first.as_str()) && !ids.contains(&retry.msg_id.as_str()));
    env.finish().await;
}

/// A gateway holds its users' subscriptions on a NATS connection of its own (`events.rs`),
/// one per socket, and each must end with its socket: a subscription left behind would have
/// NATS send that user's events to the gateway for as long as it runs. Asked of the NATS
/// server itself: a request to a subject nobody subscribes to is answered "no responders"
/// at once; one to a subject a socket holds waits for an answer that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_subscription_at_nats_lives_as_long_as_their_sockets() {
    use async_nats::client::RequestErrorKind;
    use std::time::Duration;

    let env = TestEnv::start_default().await;
    let a = env.user("alice").await;
    let nats = async_nats::connect(chat_tests::NATS_URL).await.unwrap();
    let subject = env.subjects.user(a.id);
    // Some(true): NATS routed the request to a subscriber; Some(false): it had none.
    let interest = || async {
        let ask = nats.request(subject.clone(), "".into());
        match tokio::time::timeout(Duration::from_millis(300), ask).await {
            Err(_) => Some(true),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Some(false),
            Ok(other) => panic!("nobody answers a user's subject, yet: {other:?}"),
        }
    };
    let subscriptions = |n: usize| {
        let url = format!("{}/metrics", env.base_url(0));
        async move {
            let text = reqwest::get(url).await.ok()?.text().await.ok()?;
            let line = format!("chat_gateway_event_subscriptions {n}");
            text.lines().any(|l| l == line).then_some(())
        }
    };
    assert_eq!(interest().await, Some(false), "nobody connected yet");

    let mut first = env.connect(&a).await;
    let mut second = env.connect(&a).await;
    first.backlog().await;
    second.backlog().await;
    assert_eq!(interest().await, Some(true), "two sockets subscribed");

    first.close().await;
    chat_tests::eventually("one socket's subscription ended", || subscriptions(1)).await;
    assert_eq!(
        interest().await,
        Some(true),
        "the other socket still subscribed"
    );

    second.close().await;
    chat_tests::eventually("no interest left at NATS", || async {
        (interest().await == Some(false)).then_some(())
    })
    .await;
    chat_tests::eventually("no subscription left in the gateway", || subscriptions(0)).await;
    env.finish().await;
}
