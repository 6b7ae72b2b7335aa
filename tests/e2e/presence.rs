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

/// Many users going offline together (a gateway stopping takes all its users offline at
/// once): the store records each one's last seen, the very time their peers were told. The
/// store writes such a batch in one statement; this checks that it gives each user their
/// own time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_going_offline_together_each_get_their_own_last_seen() {
    const LEAVING: usize = 30;
    let env = TestEnv::start_default().await;
    let watcher = env.user("watcher").await;
    let mut watching = env.connect(&watcher).await;
    watching.backlog().await;
    let mut leaving = Vec::new();
    for i in 0..LEAVING {
        let user = env.user(&format!("leaver{i}")).await;
        // A conversation makes the watcher one of the people told of the user's presence.
        watching
            .send_and_confirm(user.id, &format!("c{i}"), "hello")
            .await;
        let mut client = env.connect(&user).await;
        client.backlog().await;
        watching
            .expect("online", |v| {
                v["type"] == "presence" && v["user_id"] == user.id && v["online"] == true
            })
            .await;
        leaving.push((user, client));
    }
    let ids: Vec<i64> = leaving.iter().map(|(u, _)| u.id).collect();
    futures::future::join_all(leaving.into_iter().map(|(_, c)| c.close())).await;

    let mut told = std::collections::HashMap::new();
    while told.len() < LEAVING {
        let p = watching
            .expect("offline", |v| {
                v["type"] == "presence" && v["online"] == false
            })
            .await;
        told.insert(
            p["user_id"].as_i64().unwrap(),
            p["last_seen"].as_i64().unwrap(),
        );
    }
    let recorded = chat_tests::eventually("every last_seen recorded", || async {
        let (_, list) = env.get(&watcher, "/api/v1/conversations").await;
        let recorded: std::collections::HashMap<i64, i64> = list["conversations"]
            .as_array()?
            .iter()
            .filter_map(|c| {
                Some((
                    c["peer"]["user_id"].as_i64()?,
                    c["peer"]["last_seen"].as_i64()?,
                ))
            })
            .collect();
        (recorded.len() == LEAVING).then_some(recorded)
    })
    .await;
    for id in ids {
        assert_eq!(recorded.get(&id), told.get(&id), "user {id}");
    }
    env.finish().await;
}
