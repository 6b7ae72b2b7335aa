//! Several replicas of every service at once.

use std::collections::HashSet;

use chat_tests::{Options, TestEnv};

/// Two gateways, two routers, two stores: A on one gateway, B on the other, both sending.
/// Every message arrives exactly once after de-dup, msg_id order is each sender's send order,
/// and history holds exactly the messages sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_each_service_deliver_everything_once_in_order() {
    let env = TestEnv::start(Options {
        gateways: 2,
        routers: 2,
        stores: 2,
        ..Options::default()
    })
    .await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect_to(&a, 0).await;
    let mut cb = env.connect_to(&b, 1).await;
    ca.backlog().await;
    cb.backlog().await;
    const N: usize = 200;
    for i in 0..N {
        ca.send_msg(b.id, &format!("a{i}"), &format!("from a {i}"))
            .await;
        cb.send_msg(a.id, &format!("b{i}"), &format!("from b {i}"))
            .await;
    }
    let mut ids = Vec::new();
    for (client, prefix) in [(&mut ca, "a"), (&mut cb, "b")] {
        let mut mine = Vec::new();
        for i in 0..N {
            let sent = client.expect_client_id(&format!("{prefix}{i}")).await;
            assert_eq!(sent["type"], "sent", "{sent}");
            mine.push(sent["msg_id"].as_str().unwrap().to_owned());
        }
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(mine, sorted, "msg_id order is {prefix}'s send order");
        ids.extend(mine);
    }

    for (client, from) in [(&mut cb, "from a"), (&mut ca, "from b")] {
        let (mut got, _duplicates) = client.messages(N).await;
        // Conversation order is msg_id order (replicas may interleave arrival).
        got.sort_by(|x, y| x["msg_id"].as_str().cmp(&y["msg_id"].as_str()));
        let bodies: Vec<String> = got
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..N).map(|i| format!("{from} {i}")).collect();
        assert_eq!(bodies, expected);
    }

    let want: HashSet<String> = ids.into_iter().collect();
    let stored = chat_tests::eventually("history holds all 400", || async {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let path = match &before {
                Some(id) => format!(
                    "/api/v1/conversations/{}/messages?limit=200&before={id}",
                    b.id
                ),
                None => format!("/api/v1/conversations/{}/messages?limit=200", b.id),
            };
            let (_, page) = env.get(&a, &path).await;
            let msgs = page["messages"].as_array()?.clone();
            before = msgs
                .first()
                .map(|m| m["msg_id"].as_str().unwrap().to_owned());
            all.extend(msgs);
            if page["has_more"] != true {
                break;
            }
        }
        (all.len() == 2 * N).then_some(all)
    })
    .await;
    let got: HashSet<String> = stored
        .iter()
        .map(|m| m["msg_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, want);
    env.finish().await;
}

/// Replicas of every service start at the same moment on a new namespace (compose does): each
/// makes or takes the same two streams, the store stream sourcing the in stream. NATS 2.9
/// refuses a second create of a stream with sources even when it asks for the same, which
/// once stopped every service but the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_starting_together_make_the_streams_once() {
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        let starts = (0..6).map(|_| {
            let subjects = subjects.clone();
            tokio::spawn(async move {
                let nats = async_nats::connect(chat_tests::NATS_URL).await.unwrap();
                let js = async_nats::jetstream::new(nats);
                chat_runtime::nats::ensure_streams(&js, &subjects)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        });
        for result in futures::future::join_all(starts).await {
            assert_eq!(result.unwrap(), Ok(()));
        }
        let mut store = js.get_stream(subjects.store_stream()).await.unwrap();
        let sources = store.info().await.unwrap().config.sources.clone();
        let names: Vec<String> = sources.into_iter().flatten().map(|s| s.name).collect();
        assert_eq!(names, [subjects.in_stream()]);
    })
    .await;
}
