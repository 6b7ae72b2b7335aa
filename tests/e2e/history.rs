//! History pages and the conversation list.

use chat_tests::{Client, TestEnv, User};
use serde_json::{Value, json};

async fn page(env: &TestEnv, me: &User, peer: &User, before: Option<&str>, limit: u32) -> Value {
    let mut path = format!("/api/v1/conversations/{}/messages?limit={limit}", peer.id);
    if let Some(b) = before {
        path.push_str(&format!("&before={b}"));
    }
    let (status, body) = env.get(me, &path).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// History pages back without gaps or overlap; the conversation list shows the last message
/// and the unread count, and `read` clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_back_and_unread_clears_on_read() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca: Client = env.connect(&a).await;
    let mut cb: Client = env.connect(&b).await;
    ca.backlog().await;
    cb.backlog().await;
    let mut sent = Vec::new();
    let mut last_from_a = String::new();
    for i in 0..30 {
        let id = if i % 6 == 5 {
            cb.send_and_confirm(a.id, &format!("b{i}"), &format!("b says {i}"))
                .await
        } else {
            let id = ca
                .send_and_confirm(b.id, &format!("a{i}"), &format!("a says {i}"))
                .await;
            last_from_a = id.clone();
            id
        };
        sent.push(id);
    }
    chat_tests::eventually("all 30 stored", || async {
        let p = page(&env, &a, &b, None, 200).await;
        (p["messages"].as_array()?.len() == 30).then_some(())
    })
    .await;

    // Newest page first, then back in pages of 7: 30 = 7 + 7 + 7 + 7 + 2.
    let mut collected: Vec<String> = Vec::new();
    let mut before: Option<String> = None;
    let mut pages = 0;
    loop {
        let p = page(&env, &b, &a, before.as_deref(), 7).await;
        let ids: Vec<String> = p["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["msg_id"].as_str().unwrap().to_owned())
            .collect();
        pages += 1;
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "a page is oldest first");
        before = ids.first().cloned();
        collected.splice(0..0, ids);
        if p["has_more"] == false {
            break;
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(collected, sent, "no gap, no overlap");

    let list = |user: &User| {
        let user = user.clone();
        let env = &env;
        async move {
            let (status, body) = env.get(&user, "/api/v1/conversations").await;
            assert_eq!(status, 200);
            body["conversations"][0].clone()
        }
    };
    let conv = list(&b).await;
    assert_eq!(conv["peer"]["user_id"], a.id);
    assert_eq!(conv["peer"]["username"], "alice");
    assert_eq!(conv["peer"]["online"], true);
    assert_eq!(conv["last_message"]["msg_id"], *sent.last().unwrap());
    assert_eq!(conv["unread"], 25);
    assert_eq!(list(&a).await["unread"], 5);

    cb.send_json(json!({"type": "read", "peer": a.id, "up_to": last_from_a}))
        .await;
    ca.expect("read receipt", |v| {
        v["type"] == "receipt" && v["status"] == "read"
    })
    .await;
    assert_eq!(list(&b).await["unread"], 0);
    assert_eq!(list(&a).await["unread"], 5, "A's unread is untouched");
    env.finish().await;
}

/// Newest conversation first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_listed_newest_first() {
    let env = TestEnv::start_default().await;
    let (a, b, c) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("carol").await,
    );
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    ca.send_and_confirm(b.id, "1", "to bob").await;
    ca.send_and_confirm(c.id, "2", "to carol").await;
    let order = chat_tests::eventually("two conversations", || async {
        let (_, list) = env.get(&a, "/api/v1/conversations").await;
        let convs = list["conversations"].as_array()?.clone();
        (convs.len() == 2).then_some(convs)
    })
    .await;
    assert_eq!(order[0]["peer"]["username"], "carol");
    assert_eq!(order[1]["peer"]["username"], "bob");
    assert_eq!(order[0]["last_message"]["body"], "to carol");

    // A newer message moves its conversation to the top, for both of its users.
    ca.send_and_confirm(b.id, "3", "to bob again").await;
    let order = chat_tests::eventually("bob's conversation on top", || async {
        let (_, list) = env.get(&a, "/api/v1/conversations").await;
        let convs = list["conversations"].as_array()?.clone();
        (convs.first()?["last_message"]["body"] == "to bob again").then_some(convs)
    })
    .await;
    assert_eq!(order[0]["peer"]["username"], "bob");
    assert_eq!(order[1]["peer"]["username"], "carol");
    let (_, bobs) = env.get(&b, "/api/v1/conversations").await;
    assert_eq!(
        bobs["conversations"][0]["last_message"]["body"],
        "to bob again"
    );
    env.finish().await;
}
