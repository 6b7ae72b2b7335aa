//! The live-or-offline decision, per message of the in stream.
//!
//! For a batch: look up presence of every recipient and sender in one Redis round trip; hand
//! every message to the store stream (de-duplicated by msg_id, all publishes in flight at
//! once) and wait for JetStream to hold them; then push each live one to its recipient's
//! devices (the fast path) and a copy to the sender's other devices; then ack. A crash before
//! the ack redelivers, and every step repeats harmlessly.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chat_proto::frame::ServerFrame;
use chat_proto::{Message, StoreWork, UserId};
use chat_runtime::{nats, telemetry};
use tracing::Instrument;

use crate::State;

const RETRY_DELAY: Duration = Duration::from_millis(500);

pub(crate) async fn route_batch(state: &State, batch: Vec<jetstream::Message>) {
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
        return;
    }
    let sessions = session_counts(state, &items).await;
    let subject = state.subjects.store(StoreWork::Msg);
    let mut in_flight = Vec::with_capacity(items.len());
    for (msg, m) in &items {
        let live = sessions.get(&m.to).copied().unwrap_or(0) > 0;
        let span =
            tracing::info_span!("router.route", msg_id = %m.msg_id, from = m.from, to = m.to, live);
        telemetry::extract(msg.headers.as_ref(), &span);
        let headers = span.in_scope(|| nats::dedup_headers(&m.msg_id));
        let ack = state
            .js
            .publish_with_headers(subject.clone(), headers, msg.payload.clone())
            .await;
        in_flight.push((span, live, ack));
    }
    // Wait for every PubAck at once: a batch costs at most one timeout, not one per message.
    let held =
        futures::future::join_all(in_flight.into_iter().map(|(span, live, ack)| async move {
            let held = match ack {
                Ok(pending) => pending.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (span, live, held)
        }))
        .await;
    for ((msg, m), (span, live, held)) in items.into_iter().zip(held) {
        async {
            if let Err(e) = held {
                tracing::warn!(error = %e, "store stream did not take the message; redelivering");
                let _ = msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
                return;
            }
            let frame = ServerFrame::Message(m.clone());
            let path = if live { "live" } else { "offline" };
            metrics::counter!("chat_router_messages_routed_total", "path" => path).increment(1);
            if live {
                nats::publish_json(&state.nats, state.subjects.user(m.to), &frame).await;
            }
            if sessions.get(&m.from).copied().unwrap_or(0) > 1 {
                nats::publish_json(&state.nats, state.subjects.user(m.from), &frame).await;
            }
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, "cannot ack; the redelivery will repeat harmlessly");
            }
        }
        .instrument(span)
        .await;
    }
}

/// Live sessions of every recipient and sender in the batch. When Redis is down everyone
/// counts as offline: the store's sure path still delivers.
async fn session_counts(
    state: &State,
    items: &[(jetstream::Message, Message)],
) -> HashMap<UserId, i64> {
    let mut users: Vec<UserId> = items.iter().flat_map(|(_, m)| [m.to, m.from]).collect();
    users.sort_unstable();
    users.dedup();
    match state.presence.sessions(&users).await {
        Ok(counts) => users.into_iter().zip(counts).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "presence unavailable; routing everything by the store");
            HashMap::new()
        }
    }
}
