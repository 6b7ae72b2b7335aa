//! The live-or-offline decision, per message of the in stream.
//!
//! For a batch: look up presence of every recipient and sender in one Redis round trip; hand
//! every message to the store stream (de-duplicated by msg_id, all publishes in flight at
//! once), pushing each live one to its recipient's devices (the fast path) and a copy to the
//! sender's other devices right behind its publish; then wait for JetStream to hold them all
//! and ack. A crash before the ack redelivers, and every step repeats harmlessly.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::{self, AckKind};
use chat_proto::envelope::SENDER_COPIED;
use chat_proto::frame::ServerFrame;
use chat_proto::{Message, StoreWork, UserId};
use chat_runtime::{nats, telemetry};
use tracing::{Instrument, Span};

use crate::State;

const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Routes a batch up to the pushes and returns the rest of its work: waiting for the store
/// stream to hold every message, then acking each. The caller routes the next batch
/// meanwhile, so a batch's pushes never wait for the previous batch's PubAcks.
pub(crate) async fn route_batch(
    state: &State,
    batch: Vec<jetstream::Message>,
) -> impl Future<Output = ()> + Send + 'static {
    let mut items = Vec::with_capacity(batch.len());
    for msg in batch {
        match serde_json::from_slice::<Message>(&msg.payload) {
            Ok(m) => items.push((msg, m)),
            Err(e) => {
                nats::dead_letter(
                    &state.nats,
                    state.subjects.dead_letter(),
                    &msg,
                    &e.to_string(),
                )
                .await
            }
        }
    }
    if items.is_empty() {
        return settle(Vec::new());
    }
    let sessions = session_counts(state, &items).await;
    let count = |user: UserId| {
        sessions
            .as_ref()
            .and_then(|s| s.get(&user).copied())
            .unwrap_or(0)
    };
    let subject = state.subjects.store(StoreWork::Msg);
    let mut in_flight = Vec::with_capacity(items.len());
    for (msg, m) in &items {
        let live = count(m.to) > 0;
        let span =
            tracing::info_span!("router.route", msg_id = %m.msg_id, from = m.from, to = m.to, live);
        telemetry::extract(msg.headers.as_ref(), &span);
        let ack = async {
            let mut headers = nats::dedup_headers(&m.msg_id);
            // The sending device itself counts: none at all means presence is missing
            // sessions (Redis restarted empty), so the store's notice must reach the sender.
            if count(m.from) > 0 {
                headers.insert(SENDER_COPIED, "1");
            }
            let ack = state
                .js
                .publish_with_headers(subject.clone(), headers, msg.payload.clone())
                .await;
            // The in stream already holds the message, so the devices need not wait for the
            // store stream's PubAck. Written after the publish on the same connection, the
            // push does not overtake it into the store stream: a device's `ack` finds the
            // message ahead of it there (had the publish failed, the store retries the mark
            // until the redelivered message is stored).
            push(state, m, live, count(m.from) > 1).await;
            ack
        }
        .instrument(span.clone())
        .await;
        in_flight.push((span, ack));
    }
    let msgs = items.into_iter().map(|(msg, _)| msg);
    let batch = msgs
        .zip(in_flight)
        .map(|(msg, (span, publish))| (msg, span, publish));
    settle(batch.collect())
}

type Publish = Result<PublishAckFuture, PublishError>;

/// Acks each in-stream message once the store stream holds it (its PubAck came), and gives
/// it back for a later try otherwise. All PubAcks are awaited together: a batch costs at
/// most one timeout, not one per message.
async fn settle(batch: Vec<(jetstream::Message, Span, Publish)>) {
    futures::future::join_all(batch.into_iter().map(|(msg, span, publish)| {
        async move {
            let held = match publish {
                Ok(pending) => pending.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match held {
                Err(e) => {
                    tracing::warn!(error = %e, "store stream did not take the message; redelivering");
                    let _ = msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
                }
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "cannot ack; the redelivery will repeat harmlessly");
                    }
                }
            }
        }
        .instrument(span)
    }))
    .await;
}

/// The fast path: the message to the recipient's devices when any is online, and a copy to
/// the sender's other devices when there are any.
async fn push(state: &State, m: &Message, live: bool, sender_elsewhere: bool) {
    let path = if live { "live" } else { "offline" };
    metrics::counter!("chat_router_messages_routed_total", "path" => path).increment(1);
    if !live && !sender_elsewhere {
        return;
    }
    let frame = ServerFrame::Message(m.clone());
    if live {
        nats::publish_json(&state.nats, state.subjects.user(m.to), &frame).await;
    }
    if sender_elsewhere {
        nats::publish_json(&state.nats, state.subjects.user(m.from), &frame).await;
    }
}

/// Live sessions of every recipient and sender in the batch; `None` when Redis is down, and
/// then everyone counts as offline: the store's sure path still delivers, to both users.
async fn session_counts(
    state: &State,
    items: &[(jetstream::Message, Message)],
) -> Option<HashMap<UserId, i64>> {
    let mut users: Vec<UserId> = items.iter().flat_map(|(_, m)| [m.to, m.from]).collect();
    users.sort_unstable();
    users.dedup();
    match state.presence.sessions(&users).await {
        Ok(counts) => Some(users.into_iter().zip(counts).collect()),
        Err(e) => {
            tracing::warn!(error = %e, "presence unavailable; routing everything by the store");
            None
        }
    }
}
