//! NATS over TLS: every service reaches a NATS server that requires TLS with a `tls://` URL,
//! trusting its CA through `SSL_CERT_FILE`, the gateway's users'-events connection included.

use chat_tests::servers::{Certificates, Server};
use chat_tests::{Options, TestEnv};

/// A message crosses every hop over TLS: the gateway's publish, the router's push and the
/// store's write and notice (on async-nats's connections), and its arrival at the
/// recipient's socket on the gateway's events connection (its own protocol code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_reaches_nats_over_tls() {
    let certs = Certificates::for_localhost().await;
    let nats = Server::nats_tls(&certs).await;
    let env = TestEnv::start(Options {
        nats_url: Some(format!("tls://{}", nats.addr)),
        nats_ca: Some(certs.ca.clone()),
        processes: true,
        ..Options::default()
    })
    .await;
    let ((_, mut ca), (b, mut cb)) = env.online_pair().await;
    let id = ca.send_and_confirm(b.id, "tls-1", "over TLS").await;
    let m = cb.expect_body("over TLS").await;
    assert_eq!(m["msg_id"], id.as_str());
    cb.send_json(serde_json::json!({"type": "ack", "msg_ids": [id]}))
        .await;
    let receipt = ca.expect_type("receipt").await;
    assert_eq!(receipt["status"], "delivered");

    let ready = reqwest::get(format!("{}/readyz", env.base_url(0)))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(ready["nats-events"], "ok");
    env.finish().await;
}
