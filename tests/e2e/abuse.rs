//! Overload and abuse: a client that never reads, garbage on the socket, a connection storm.

use chat_tests::{Client, Options, TestEnv};
use futures::future::join_all;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A client that never reads fills its bounded queue and is dropped with 1008; the others
/// keep getting their messages meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_nobody_else_waits() {
    let env = TestEnv::start(Options {
        outbound_queue: 32,
        send_rate: 100_000,
        send_burst: 100_000,
        ..Options::default()
    })
    .await;
    let (a, b, c) = (
        env.user("alice").await,
        env.user("bob").await,
        env.user("carol").await,
    );
    let mut ca = env.connect(&a).await;
    let mut stuck = env.connect(&b).await; // never reads until the end
    let mut cc = env.connect(&c).await;
    ca.backlog().await;
    cc.backlog().await;
    // Far more than the socket buffers and the queue hold: 6,000 frames of 4 KiB.
    let body = "x".repeat(4096);
    const N: usize = 6000;
    for chunk in 0..N / 100 {
        // A reads its answers as it goes (else it would be a slow reader too).
        for i in chunk * 100..(chunk + 1) * 100 {
            ca.send_msg(b.id, &format!("b{i}"), &body).await;
        }
        let to_carol = format!("to carol {chunk}");
        ca.send_msg(c.id, &format!("c{chunk}"), &to_carol).await;
        for i in chunk * 100..(chunk + 1) * 100 {
            assert_eq!(ca.expect_client_id(&format!("b{i}")).await["type"], "sent");
        }
        // Carol is served all along.
        cc.expect_body(&to_carol).await;
    }
    // The gateway let go of it (its queue was full: it is not waiting on the client) ...
    chat_tests::eventually("the stuck client dropped", || async {
        let r = env
            .request(reqwest::Method::GET, "/metrics", None)
            .send()
            .await
            .ok()?;
        r.text()
            .await
            .ok()?
            .contains("chat_gateway_connections 2")
            .then_some(())
    })
    .await;
    // ... and the client, once it reads, finds its socket closed: with 1008 when the close
    // frame still fitted in the socket's buffers, else by the TCP connection ending.
    let code = stuck.expect_close().await;
    assert!(matches!(code, None | Some(1008)), "{code:?}");
    // It comes back and gets what it missed, from the backlog.
    let mut back = env.connect(&b).await;
    let (missed, _) = back.backlog().await;
    assert!(!missed.is_empty());
    env.finish().await;
}

/// Garbage never takes the gateway down: random bytes, deep nesting and invalid UTF-8 get an
/// error or a close, and the next client is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_gets_an_error_or_a_close_never_a_crash() {
    let env = TestEnv::start_default().await;
    let a = env.user("alice").await;
    let mut ca = env.connect(&a).await;
    ca.backlog().await;
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    for garbage in [
        deep.as_str(),
        "{\"type\":",
        "\u{0}\u{1}\u{2}",
        "{\"type\":\"send\",\"to\":1e999}",
    ] {
        ca.send_text(garbage).await;
        ca.expect_error("bad_request").await;
    }
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    ca.send_raw(WsMessage::Binary(noise.into())).await;
    ca.expect_error("bad_request").await;
    ca.send_json(json!({"type": "ping"})).await;
    ca.expect_type("pong").await;

    // Invalid UTF-8 in a text frame breaks the WebSocket protocol: the server closes.
    let invalid = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    ca.send_raw(WsMessage::Frame(invalid)).await;
    let _ = ca.expect_close().await;

    let mut again: Client = env.connect(&a).await;
    again.backlog().await;
    again.send_json(json!({"type": "ping"})).await;
    again.expect_type("pong").await;
    env.finish().await;
}

/// Two thousand connections opened at once all get `hello` (and `backlog_done`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_at_once_all_get_hello() {
    let env = TestEnv::start_default().await;
    let mut users = Vec::new();
    for i in 0..20 {
        users.push(env.user(&format!("crowd{i}")).await);
    }
    let url = env.ws_url(0);
    let attempts = (0..2000).map(|i| {
        let (url, user) = (url.clone(), users[i % users.len()].clone());
        tokio::spawn(async move {
            let mut c = Client::connect(&url, &user).await?;
            c.backlog().await;
            anyhow::Ok(c)
        })
    });
    let results = join_all(attempts).await;
    let clients: Vec<Client> = results
        .into_iter()
        .map(|r| r.expect("task").expect("connected with hello"))
        .collect();
    assert_eq!(clients.len(), 2000);
    assert!(clients.iter().all(|c| c.hello["type"] == "hello"));
    drop(clients);
    env.finish().await;
}
