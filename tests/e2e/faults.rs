//! Faults: services killed with `kill -9` mid-traffic (real processes), and poison messages.
//! Each kill run checks every delivery guarantee over 1,000 messages among 20 users.

use std::time::Duration;

use chat_tests::traffic::Traffic;
use chat_tests::{Options, TestEnv, User};
use futures::StreamExt;
use serde_json::json;

const USERS: usize = 20;
const MESSAGES: usize = 1000;

/// A deployment of real processes (with `options` on top) and its 20 users.
async fn deployment(options: Options) -> (TestEnv, Vec<User>) {
    let env = TestEnv::start(Options {
        processes: true,
        ack_wait: Duration::from_secs(2),
        ..options
    })
    .await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(env.user(&format!("user{i}")).await);
    }
    (env, users)
}

async fn process_env() -> (TestEnv, Vec<User>) {
    deployment(Options::default()).await
}

fn traffic(users: &[User]) -> Traffic {
    Traffic {
        users: users.to_vec(),
        messages: MESSAGES,
        pace: Duration::from_millis(30),
    }
}

/// `Some` once the service at `ops_url` is ready (`want`) or not: a probe of its `/readyz`,
/// which when not ready must name the error and the check that failed.
async fn readyz_is(ops_url: &str, want: bool) -> Option<()> {
    let r = reqwest::get(format!("{ops_url}/readyz")).await.ok()?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.ok()?;
    if !status.is_success() {
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "not_ready");
        assert!(body["checks"].as_object()?.values().any(|v| v == "down"));
    }
    (status.is_success() == want).then_some(())
}

/// Scenario 1: `kill -9` the router mid-traffic, start it again: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_traffic_loses_nothing() {
    let (mut env, users) = process_env().await;
    let mut router = env.take_router(0);
    let (report, router) = traffic(&users)
        .run(vec![env.ws_url(0)], |progress| async move {
            progress.until_sent(300).await;
            router.kill9().await;
            progress.until_sent(500).await;
            router.restart().await;
            router
        })
        .await;
    env.put_back(router);
    report.check(&env).await;
    env.finish().await;
}

/// Scenario 2: `kill -9` the store while it writes, start it again: nothing lost, nothing
/// written twice (history holds each message once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_killed_mid_traffic_loses_and_doubles_nothing() {
    let (mut env, users) = process_env().await;
    let mut store = env.take_store(0);
    let (report, store) = traffic(&users)
        .run(vec![env.ws_url(0)], |progress| async move {
            // By then every sender has written to every recipient once, so the gateway knows
            // them all and keeps accepting while no store answers.
            progress.until_sent(450).await;
            store.kill9().await;
            progress.until_sent(700).await;
            store.restart().await;
            store
        })
        .await;
    env.put_back(store);
    report.check(&env).await;
    env.finish().await;
}

/// A message and the recipient's `ack` of it that wait out a store outage together are
/// written in one batch, messages first: the mark finds its message at once (none is given
/// back to wait for it), the sender gets its `delivered` receipt, and history says delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_and_its_ack_waiting_out_a_store_outage_are_written_together() {
    let mut env = TestEnv::start(Options {
        processes: true,
        // Ample time for the two to come in one batch however busy the machine is.
        process_env: vec![("CHAT_STORE_LINGER".into(), "2s".into())],
        ..Options::default()
    })
    .await;
    let ((a, mut ca), (b, mut cb)) = env.online_pair().await;
    // While the store answers, the gateway learns that b exists.
    ca.send_and_confirm(b.id, "c-1", "before").await;
    cb.expect_body("before").await;
    let mut store = env.take_store(0);
    assert!(
        store.terminate(Duration::from_secs(20)).await.is_some(),
        "the store stops by itself"
    );

    let id = ca.send_and_confirm(b.id, "c-2", "during").await;
    cb.expect_body("during").await;
    cb.send_json(json!({"type": "ack", "msg_ids": [id]})).await;
    // Both wait in the store stream: the message's copy and the mark.
    let nats = async_nats::connect(env.nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    chat_tests::eventually("the message and its mark in the store stream", || {
        let js = js.clone();
        let name = env.subjects.store_stream();
        async move {
            let mut stream = js.get_stream(name).await.ok()?;
            (stream.info().await.ok()?.state.messages == 2).then_some(())
        }
    })
    .await;

    store.restart().await;
    env.put_back(store);
    let receipt = ca
        .expect("the delivered receipt", |v| v["type"] == "receipt")
        .await;
    assert_eq!(
        receipt,
        json!({"type": "receipt", "msg_id": id, "peer": b.id, "status": "delivered"})
    );
    let (status, page) = env
        .get(&a, &format!("/api/v1/conversations/{}/messages", b.id))
        .await;
    assert_eq!(status, 200);
    let during = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["msg_id"] == id);
    assert_eq!(during.unwrap()["status"], "delivered", "{page}");
    let metrics = reqwest::get(format!("{}/metrics", env.store_ops_url(0)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("chat_store_marks_early_total"),
        "a mark waited for its message: {metrics}"
    );
    env.finish().await;
}

/// Scenario 9: undecodable payloads in either stream are dead-lettered (once: by the store,
/// whose stream also holds the in stream's copy; the router skips them) and terminated, and
/// traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_traffic_goes_on() {
    let env = TestEnv::start_default().await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let nats = async_nats::connect(chat_tests::NATS_URL).await.unwrap();
    let mut dead = nats.subscribe(env.subjects.dead_letter()).await.unwrap();
    nats.flush().await.unwrap();
    let js = async_nats::jetstream::new(nats.clone());
    for (subject, payload) in [
        (env.subjects.inbound(), "not json at all"),
        (
            env.subjects.store(chat_proto::StoreWork::Msg),
            r#"{"msg_id": 7}"#,
        ),
        (env.subjects.store(chat_proto::StoreWork::Ack), "\u{0}\u{1}"),
    ] {
        js.publish(subject, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut letters = Vec::new();
    while letters.len() < 3 {
        let m = tokio::time::timeout(chat_tests::WAIT, dead.next())
            .await
            .expect("dead letters")
            .unwrap();
        letters.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    letters.sort();
    assert_eq!(
        letters,
        ["\u{0}\u{1}", "not json at all", r#"{"msg_id": 7}"#]
    );

    let mut ca = env.connect(&a).await;
    let mut cb = env.connect(&b).await;
    ca.backlog().await;
    cb.backlog().await;
    ca.send_and_confirm(b.id, "after", "still flowing").await;
    cb.expect_body("still flowing").await;
    cb.send_json(json!({"type": "ping"})).await;
    cb.expect_type("pong").await;
    // Terminated, not waiting for redelivery: both consumers have nothing left to do.
    env.consumers_done().await;
    env.finish().await;
}

/// A gateway whose link to NATS fails for a while keeps its sockets, but what was published
/// for their users meanwhile is gone (core NATS keeps nothing for a subscriber that is
/// away): the router's push and the store's notice of a message sent then. Once NATS is back,
/// each socket catches up from the backlog, so the connected recipient gets the message
/// without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_back_from_losing_nats_catches_its_sockets_up() {
    let mut env = TestEnv::start(Options::default()).await;
    let link = chat_tests::link::Link::start(
        env.nats_url()
            .strip_prefix("nats://")
            .expect("a nats:// URL"),
    )
    .await;
    let cut_off = env.start_gateway_via(&link.url()).await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect(&a).await;
    let mut cb = env.connect_to(&b, cut_off).await;
    ca.backlog().await;
    cb.backlog().await;
    ca.send_and_confirm(b.id, "before", "before the cut").await;
    cb.expect_body("before the cut").await;

    link.cut();
    let ready = format!("{}/readyz", env.base_url(cut_off));
    chat_tests::eventually("bob's gateway knows NATS is gone", || async {
        let r = reqwest::get(&ready).await.ok()?;
        (r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    ca.send_and_confirm(b.id, "during", "while bob's gateway was cut off")
        .await;
    // Pushed by the router and stored and announced by the store, both into the void:
    // both consumers are done with it.
    env.consumers_done().await;

    link.restore();
    // The same socket, no reconnect: the catch-up brings it.
    cb.expect_body("while bob's gateway was cut off").await;
    // And live traffic goes on as before.
    ca.send_and_confirm(b.id, "after", "after the cut").await;
    cb.expect_body("after the cut").await;
    env.finish().await;
}

/// Scenarios 3 and 4: `kill -9` a gateway that holds half the senders and recipients; their
/// clients reconnect to the other gateway, resend what had no `sent` with the same
/// client_id, and get what they had not acked: nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_traffic_loses_and_doubles_nothing() {
    let (mut env, users) = process_env().await;
    env.start_gateway().await;
    let urls = vec![env.ws_url(0), env.ws_url(1)];
    let mut gateway = env.take_gateway(0);
    let (report, gateway) = traffic(&users)
        .run(urls, |progress| async move {
            progress.until_sent(400).await;
            gateway.kill9().await;
            progress.until_sent(700).await;
            gateway.restart().await;
            gateway
        })
        .await;
    assert!(
        report.reconnects >= USERS / 2,
        "the killed gateway's clients reconnected"
    );
    env.put_back_gateway(0, gateway);
    report.check(&env).await;
    env.finish().await;
}

/// Scenario 4, presence: a user whose gateway dies shows offline to peers within the
/// presence TTL (2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_gateways_users_go_offline_within_the_ttl() {
    let mut env = TestEnv::start(Options {
        processes: true,
        gateways: 2,
        presence_ttl: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let (a, b) = (env.user("alice").await, env.user("bob").await);
    let mut ca = env.connect_to(&a, 1).await;
    ca.backlog().await;
    ca.send_and_confirm(b.id, "hi", "hi").await;
    let mut cb = env.connect_to(&b, 0).await;
    cb.backlog().await;
    ca.expect("B online", |v| {
        v["type"] == "presence" && v["user_id"] == b.id && v["online"] == true
    })
    .await;
    let mut gateway = env.take_gateway(0);
    gateway.kill9().await;
    let killed = std::time::Instant::now();
    let p = ca
        .expect("B offline", |v| {
            v["type"] == "presence" && v["user_id"] == b.id
        })
        .await;
    assert_eq!(p["online"], false);
    assert!(
        killed.elapsed() < Duration::from_secs(2) + Duration::from_millis(1500),
        "{:?}",
        killed.elapsed()
    );
    env.put_back(gateway);
    env.finish().await;
}

/// Scenario 5: NATS (JetStream on file storage) killed and restarted mid-traffic: nothing
/// that got `sent` is lost; every service reconnects by itself; clients see a pause (and
/// `internal` answers they retry with the same client_id). A retry whose first try reached
/// the stream just before the restart still gets the first msg_id: the in stream keeps its
/// messages for the de-dup window, from which JetStream rebuilds its de-dup memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_traffic_loses_nothing() {
    let mut nats = chat_tests::servers::Server::nats().await;
    let (env, users) = deployment(Options {
        nats_url: Some(format!("nats://{}", nats.addr)),
        ..Options::default()
    })
    .await;
    let (report, nats) = traffic(&users)
        .run(vec![env.ws_url(0)], |progress| async move {
            progress.until_sent(300).await;
            nats.restart().await;
            nats
        })
        .await;
    report.check(&env).await;
    env.finish().await;
    drop(nats);
}

/// Scenario 6: Redis (which keeps nothing) restarted mid-traffic: messages still arrive (the
/// store's path does not need presence), and presence rebuilds from the gateways' heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_loses_nothing_and_presence_rebuilds() {
    let mut redis = chat_tests::servers::Server::redis().await;
    let (env, users) = deployment(Options {
        presence_ttl: Duration::from_secs(3),
        redis_url: Some(format!("redis://{}", redis.addr)),
        ..Options::default()
    })
    .await;
    let router = env.router_ops_url(0);
    let watcher = env.user("watcher").await;
    let mut online = env.connect(&users[0]).await;
    online.backlog().await;
    let (report, redis) = traffic(&users)
        .run(vec![env.ws_url(0)], |progress| async move {
            progress.until_sent(300).await;
            redis.kill9().await;
            chat_tests::eventually("router not ready without Redis", || {
                readyz_is(&router, false)
            })
            .await;
            redis.restart().await;
            chat_tests::eventually("router ready again", || readyz_is(&router, true)).await;
            redis
        })
        .await;
    report.check(&env).await;
    // users[0] stayed connected throughout: the heartbeat put it back in the empty Redis.
    chat_tests::eventually("presence rebuilt", || async {
        let (_, found) = env.get(&watcher, "/api/v1/users?q=user0").await;
        (found["users"][0]["online"] == true).then_some(())
    })
    .await;
    env.finish().await;
    drop(redis);
}

/// Scenario 7: MariaDB stopped for 10 s under traffic. Sends still get `sent` (JetStream
/// holds them), the store's `/readyz` says not ready meanwhile, and after MariaDB returns the
/// store's retries (with backoff) write everything: nothing lost, nothing written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_stopped_for_ten_seconds_loses_nothing() {
    const OUTAGE: Duration = Duration::from_secs(10);
    let mut mariadb = chat_tests::servers::Server::mariadb().await;
    let (env, users) = deployment(Options {
        mysql_server: Some(mariadb.mysql_url()),
        ..Options::default()
    })
    .await;
    let store = env.store_ops_url(0);
    chat_tests::eventually("store ready", || readyz_is(&store, true)).await;
    let (report, (mariadb, stopped_at, sent_during)) = traffic(&users)
        .run(vec![env.ws_url(0)], |progress| async move {
            progress.until_sent(300).await;
            mariadb.kill9().await;
            let stopped = progress.sent();
            chat_tests::eventually("store not ready without MariaDB", || {
                readyz_is(&store, false)
            })
            .await;
            // The outage lasts 10 s (the scenario's length, not a wait for something).
            tokio::time::sleep(OUTAGE).await;
            let sent_during = progress.sent() - stopped;
            mariadb.restart().await;
            chat_tests::eventually("store ready again", || readyz_is(&store, true)).await;
            (mariadb, stopped, sent_during)
        })
        .await;
    // How many were still to send when MariaDB stopped depends on the host's speed. At least
    // half of those must have got `sent` during the outage (in the runs here all did; a send
    // that needs the store, such as a recipient's first lookup, may wait for MariaDB).
    let left = MESSAGES - stopped_at;
    assert!(
        left >= 200,
        "MariaDB stopped mid-traffic ({stopped_at} of {MESSAGES} were sent already)"
    );
    assert!(
        sent_during * 2 >= left,
        "sends got `sent` while MariaDB was down ({sent_during} of the {left} left did)"
    );
    report.check(&env).await;
    env.finish().await;
    drop(mariadb);
}

/// SIGTERM to a replica of each service while traffic flows (what compose sends on a scale
/// down or a redeploy): each exits by itself within its grace period, the gateway closes its
/// sockets with 1001 and ends their sessions at once (a peer sees the user offline long before
/// the presence TTL), and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_replica_of_each_service_loses_nothing() {
    const GRACE: Duration = Duration::from_secs(15);
    let (mut env, users) = deployment(Options {
        gateways: 2,
        routers: 2,
        stores: 2,
        presence_ttl: Duration::from_secs(60),
        ..Options::default()
    })
    .await;
    let (leaver, watcher) = (env.user("leaver").await, env.user("watcher").await);
    let mut on_leaving = env.connect_to(&leaver, 0).await;
    let mut watching = env.connect_to(&watcher, 1).await;
    on_leaving.backlog().await;
    watching.backlog().await;
    on_leaving.send_and_confirm(watcher.id, "hi", "hi").await;
    watching.expect_body("hi").await;

    let urls = vec![env.ws_url(0), env.ws_url(1)];
    let (gateway, router, store) = (env.take_gateway(0), env.take_router(0), env.take_store(0));
    // Slower than the other runs, so every stop lands while all clients are still sending
    // (a router or store takes up to 2 s to stop: it drains its last pulls).
    let run = Traffic {
        pace: Duration::from_millis(500),
        ..traffic(&users)
    };
    let (report, (gateway, router, store)) = run
        .run(urls, |progress| async move {
            let (mut gateway, mut router, mut store) = (gateway, router, store);
            progress.until_sent(250).await;
            let status = store.terminate(GRACE).await;
            assert!(status.is_some_and(|s| s.success()), "store: {status:?}");
            progress.until_sent(450).await;
            let status = router.terminate(GRACE).await;
            assert!(status.is_some_and(|s| s.success()), "router: {status:?}");
            progress.until_sent(650).await;
            let status = gateway.terminate(GRACE).await;
            assert!(status.is_some_and(|s| s.success()), "gateway: {status:?}");
            // A redeploy brings it back (the history check goes through it); the router and
            // store stay down: their other replicas carry on.
            gateway.restart().await;
            (gateway, router, store)
        })
        .await;
    assert!(
        report.reconnects >= USERS / 2,
        "the stopped gateway's clients reconnected ({})",
        report.reconnects
    );
    assert_eq!(on_leaving.expect_close().await, Some(1001));
    let offline = watching
        .expect("leaver offline", |v| {
            v["type"] == "presence" && v["user_id"] == leaver.id
        })
        .await;
    assert_eq!(offline["online"], false);
    env.put_back_gateway(0, gateway);
    env.put_back(router);
    env.put_back(store);
    report.check(&env).await;
    env.finish().await;
}

/// SIGTERM while NATS is away (everything stopped during an outage, or a redeploy racing a
/// NATS restart): each service still exits by itself within seconds, instead of waiting for
/// NATS to come back before its last flush, or for a request to NATS to time out. The
/// services are stopped one after another, as an operator would, each after traffic that
/// left it subscriptions and pulls in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_nats_is_away_stops_every_service() {
    // A stop takes its pulls' end (2 s at most) and the last flush's bound (2 s): this is
    // twice that.
    const GRACE: Duration = Duration::from_secs(8);
    let mut nats = chat_tests::servers::Server::nats().await;
    let mut env = TestEnv::start(Options {
        processes: true,
        nats_url: Some(format!("nats://{}", nats.addr)),
        ..Options::default()
    })
    .await;
    let ((_, mut alice), (bob, mut on_bob)) = env.online_pair().await;
    alice
        .send_and_confirm(bob.id, "before", "before the outage")
        .await;
    on_bob.expect_body("before the outage").await;

    nats.kill9().await;
    let stopping = [
        ("gateway", env.take_gateway(0)),
        ("router", env.take_router(0)),
        ("store", env.take_store(0)),
    ];
    for (name, mut service) in stopping {
        let status = service.terminate(GRACE).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "the {name} did not exit by itself within {GRACE:?} of SIGTERM while NATS was away: \
             {status:?}"
        );
    }
    // Back for the namespace's cleanup.
    nats.restart().await;
    env.finish().await;
}

/// Scenario 8: two of each service, and a replica of a randomly chosen service killed with
/// `kill -9` (and restarted) every 500 messages while traffic flows for about a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_replica_kills_for_a_minute_lose_and_double_nothing() {
    let (mut env, users) = deployment(Options {
        gateways: 2,
        routers: 2,
        stores: 2,
        ..Options::default()
    })
    .await;
    let urls = vec![env.ws_url(0), env.ws_url(1)];
    let mut procs = vec![
        env.take_gateway(0),
        env.take_gateway(1),
        env.take_router(0),
        env.take_router(0),
        env.take_store(0),
        env.take_store(0),
    ];
    // 20 users, 300 messages each, one every 200 ms: a minute of traffic.
    let run = Traffic {
        users: users.clone(),
        messages: USERS * 300,
        pace: Duration::from_millis(200),
    };
    let (report, procs) = run
        .run(urls, |progress| async move {
            // A fixed pseudo-random order, so a failure can be replayed.
            let mut pick: u64 = 0x2545_f491_4f6c_dd1d;
            for step in 1..12 {
                progress.until_sent(step * 500).await;
                pick ^= pick << 13;
                pick ^= pick >> 7;
                pick ^= pick << 17;
                let victim = (pick % procs.len() as u64) as usize;
                procs[victim].restart().await;
            }
            procs
        })
        .await;
    let mut procs = procs.into_iter();
    for i in 0..2 {
        env.put_back_gateway(i, procs.next().unwrap());
    }
    for p in procs {
        env.put_back(p);
    }
    report.check(&env).await;
    env.finish().await;
}

/// A replica stopped gracefully handles what its last pull brought before it exits: nothing
/// it was given waits out the ack wait (here 10 minutes) for another replica, and a message
/// sent after it stopped goes to the next replica at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_handles_what_it_pulled_and_takes_no_more() {
    const COUNT: u64 = 50;
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        let (inbound, _) = chat_runtime::nats::ensure_streams(&js, &subjects)
            .await
            .unwrap();
        for i in 0..COUNT {
            accept(&js, &subjects, i).await;
        }
        let consumer =
            chat_runtime::nats::durable_consumer(&inbound, "drain", Duration::from_secs(600))
                .await
                .unwrap();
        // (delivered but not acked, not yet delivered)
        let counts = || {
            let mut consumer = consumer.clone();
            async move {
                let info = consumer.info().await.unwrap();
                (info.num_ack_pending as u64, info.num_pending)
            }
        };

        // A replica reports the stream sequence of each message it takes, then waits for a permit
        // before it acks.
        let replica = |permits: std::sync::Arc<tokio::sync::Semaphore>| {
            let (taken_tx, taken) = tokio::sync::mpsc::unbounded_channel();
            let cancel = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(chat_runtime::nats::consume(
                consumer.clone(),
                1,
                std::time::Duration::ZERO,
                cancel.clone(),
                move |batch| {
                    let (taken_tx, permits) = (taken_tx.clone(), permits.clone());
                    async move {
                        for msg in batch {
                            let _ = taken_tx.send(msg.info().unwrap().stream_sequence);
                            permits.acquire().await.unwrap().forget();
                            msg.double_ack().await.unwrap();
                        }
                    }
                },
            ));
            (task, taken, cancel)
        };
        let held = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let (first, mut first_taken, stop_first) = replica(held.clone());
        let mut taken = vec![
            tokio::time::timeout(chat_tests::WAIT, first_taken.recv())
                .await
                .expect("the first replica takes a message")
                .unwrap(),
        ];
        // The rest has reached the first replica's pull too: stopping it now would strand them.
        chat_tests::eventually("every message delivered to the first replica", || async {
            (counts().await.0 == COUNT).then_some(())
        })
        .await;
        stop_first.cancel();
        held.add_permits(COUNT as usize);
        tokio::time::timeout(chat_tests::WAIT, first)
            .await
            .expect("the first replica stops")
            .unwrap();
        while let Ok(seq) = first_taken.try_recv() {
            taken.push(seq);
        }
        assert_eq!(taken, (1..=COUNT).collect::<Vec<_>>(), "handled, in order");
        assert_eq!(counts().await, (0, 0), "nothing left awaiting an ack");

        accept(&js, &subjects, COUNT).await;
        let (second, mut second_taken, stop_second) =
            replica(std::sync::Arc::new(tokio::sync::Semaphore::new(1)));
        let next = tokio::time::timeout(chat_tests::WAIT, second_taken.recv())
            .await
            .expect("the next replica gets a message sent after the stop")
            .unwrap();
        stop_second.cancel();
        second.await.unwrap();
        assert_eq!(next, COUNT + 1);
    })
    .await;
}

/// A consumer always has a pull request waiting at the server, also when one of its pulls
/// ends: a message never waits for the consumer to notice that its pull is over (NATS 2.9.10
/// often ends a pull that delivered something without saying so, and waiting for that pull's
/// end held every message for a second). Traffic flows through more than two pulls'
/// lifetimes while the server's count of waiting pulls is read after every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_keeps_a_pull_waiting_across_its_pulls_ends() {
    /// Three pulls' lifetimes (1 s plus the 1 s margin each): a dozen pulls end in it.
    const TRAFFIC: Duration = Duration::from_secs(6);
    const EVERY: Duration = Duration::from_millis(50);
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        let (inbound, _) = chat_runtime::nats::ensure_streams(&js, &subjects)
            .await
            .unwrap();
        let consumer =
            chat_runtime::nats::durable_consumer(&inbound, "steady", Duration::from_secs(60))
                .await
                .unwrap();
        let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(chat_runtime::nats::consume(
            consumer.clone(),
            16,
            Duration::ZERO,
            cancel.clone(),
            move |msgs| {
                let handled_tx = handled_tx.clone();
                async move {
                    for msg in msgs {
                        msg.ack().await.unwrap();
                        let _ = handled_tx.send(());
                    }
                }
            },
        ));
        let mut info = consumer.clone();
        chat_tests::eventually("the consumer pulling", || {
            let mut info = info.clone();
            async move { (info.info().await.ok()?.num_waiting > 0).then_some(()) }
        })
        .await;

        let mut pace = tokio::time::interval(EVERY);
        let mut sent = 0;
        let mut idle_moments = 0;
        let end = tokio::time::Instant::now() + TRAFFIC;
        while tokio::time::Instant::now() < end {
            pace.tick().await;
            accept(&js, &subjects, sent).await;
            sent += 1;
            if info.info().await.unwrap().num_waiting == 0 {
                idle_moments += 1;
            }
        }
        for _ in 0..sent {
            tokio::time::timeout(chat_tests::WAIT, handled.recv())
                .await
                .expect("every message handed on")
                .unwrap();
        }
        assert_eq!(
            idle_moments, 0,
            "the server had no pull waiting after {idle_moments} of {sent} messages"
        );
        chat_tests::eventually("every message acked", || {
            let mut consumer = consumer.clone();
            async move { (consumer.info().await.ok()?.num_ack_pending == 0).then_some(()) }
        })
        .await;
        cancel.cancel();
        tokio::time::timeout(chat_tests::WAIT, task)
            .await
            .expect("the consumer stops")
            .unwrap();
    })
    .await;
}

/// Puts `i` into the in stream and waits for JetStream to accept it.
async fn accept(js: &async_nats::jetstream::Context, subjects: &chat_proto::Subjects, i: u64) {
    js.publish(subjects.inbound(), i.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A consumer with a linger (the store's) hands on messages that arrive one after another as
/// one batch, never more than its batch size at once and in stream order, and still hands on
/// a lone message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_consumer_gathers_what_arrives_together() {
    const COUNT: u64 = 10;
    const LINGER: Duration = Duration::from_secs(2);
    chat_tests::in_fresh_namespace(|js, subjects| async move {
        let (inbound, _) = chat_runtime::nats::ensure_streams(&js, &subjects)
            .await
            .unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        // Each consumer reports the stream sequences of every batch it was handed.
        let start = |durable: &'static str, batch: usize| {
            let (batches_tx, batches) = tokio::sync::mpsc::unbounded_channel();
            let (inbound, cancel) = (inbound.clone(), cancel.clone());
            let task = tokio::spawn(async move {
                let consumer = chat_runtime::nats::durable_consumer(
                    &inbound,
                    durable,
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
                chat_runtime::nats::consume(consumer, batch, LINGER, cancel, move |msgs| {
                    let batches_tx = batches_tx.clone();
                    async move {
                        let seqs: Vec<u64> = msgs
                            .iter()
                            .map(|m| m.info().unwrap().stream_sequence)
                            .collect();
                        for msg in msgs {
                            msg.ack().await.unwrap();
                        }
                        let _ = batches_tx.send(seqs);
                    }
                })
                .await;
            });
            (task, batches)
        };
        let (wide, mut wide_batches) = start("wide", 256);
        let (narrow, mut narrow_batches) = start("narrow", 4);
        // Both consumers pull before the first message: each arrives on its own.
        chat_tests::eventually("both consumers pulling", || {
            let inbound = inbound.clone();
            async move {
                for durable in ["wide", "narrow"] {
                    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                        inbound.get_consumer(durable).await.ok()?;
                    (consumer.info().await.ok()?.num_waiting > 0).then_some(())?;
                }
                Some(())
            }
        })
        .await;
        for i in 0..COUNT {
            accept(&js, &subjects, i).await;
        }
        async fn next(batches: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u64>>) -> Vec<u64> {
            tokio::time::timeout(chat_tests::WAIT, batches.recv())
                .await
                .expect("a batch is handed on")
                .expect("the consumer runs")
        }
        assert_eq!(
            next(&mut wide_batches).await,
            (1..=COUNT).collect::<Vec<_>>(),
            "one batch of all that arrived within the linger"
        );
        let mut narrow_seen = Vec::new();
        while narrow_seen.len() < COUNT as usize {
            let batch = next(&mut narrow_batches).await;
            assert!(batch.len() <= 4, "a batch over its size: {batch:?}");
            narrow_seen.extend(batch);
        }
        assert_eq!(narrow_seen, (1..=COUNT).collect::<Vec<_>>(), "in order");

        accept(&js, &subjects, COUNT).await;
        assert_eq!(
            next(&mut wide_batches).await,
            vec![COUNT + 1],
            "a lone message"
        );
        cancel.cancel();
        for task in [wide, narrow] {
            tokio::time::timeout(chat_tests::WAIT, task)
                .await
                .expect("the consumer stops")
                .unwrap();
        }
    })
    .await;
}
