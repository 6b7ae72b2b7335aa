//! Presence: peers see a user come online and go offline.

use chat_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_the_user_come_online_and_go_offline() {
    let env = TestEnv::start_default().await;
    let (a, b, c) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("carol").await,
    );
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    // A conversation makes A one of the people who hear of B's presence.
    ca.send_and_confirm(b.id, "hi", "hi bob").await;

    let mut cb = env.connect(&b).await;
    let p = ca
        .expect("B online", |v| {
            v["type"] == "presence" && v["user_id"] == b.id
        })
        .await;
    assert_eq!(p["online"], true);
    let (_, found) = env.get(&a, "/api/v1/users?q=bo").await;
    assert_eq!(found["users"][0]["online"], true);

    // A second device does not announce again; closing one of two keeps B online.
    let cb2 = env.connect(&b).await;
    cb2.close().await;
    cb.backlog().await;
    cb.close().await;
    let p = ca
        .expect("B offline", |v| {
            v["type"] == "presence" && v["user_id"] == b.id
        })
        .await;
    assert_eq!(
        p["online"], false,
        "exactly one online event came before: {p}"
    );
    assert!(p["last_seen"].as_i64().unwrap() > 0);

    let peer = chat_tests::eventually("last_seen recorded", || async {
        let (_, list) = env.get(&a, "/api/v1/conversations").await;
        let peer = list["conversations"][0]["peer"].clone();
        peer["last_seen"].as_i64().map(|_| peer)
    })
    .await;
    assert_eq!(peer["online"], false);
    assert_eq!(peer["user_id"], b.id);

    // Carol shares no conversation with B: she hears nothing of B, yet can see B in search.
    let mut cc = env.connect(&c).await;
    cc.backlog().await;
    let (_, found) = env.get(&c, "/api/v1/users?q=bob").await;
    assert_eq!(found["users"][0]["online"], false);
    env.finish().await;
}

/// The first message ever between two users, sent just before the recipient connects: the
/// sender still hears that the recipient came online (the session is announced only once
/// the pipeline has stored what was sent before the connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_just_before_connecting_still_brings_presence() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    ca.send_and_confirm(b.id, "first", "first ever").await;
    let mut cb = env.connect(&b).await;
    let (backlog, _) = cb.backlog().await;
    assert_eq!(backlog[0]["body"], "first ever");
    let p = ca
        .expect("B online", |v| {
            v["type"] == "presence" && v["user_id"] == b.id
        })
        .await;
    assert_eq!(p["online"], true);
    env.finish().await;
}
