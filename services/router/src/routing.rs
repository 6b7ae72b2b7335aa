//! The live-or-offline decision, per message of the in stream.
//!
//! For a batch: look up presence of every recipient and sender in one Redis round trip, push
//! each message whose recipient is online to the recipient's devices (the fast path) and a
//! copy to the sender's other devices, then ack. Storing is not the router's job: the store
//! stream sources the in stream, so NATS itself hands every accepted message to the store,
//! whose notice after the commit is the sure path. A push lost to a crash is redone on
//! redelivery, or made needless by that notice; devices de-dup either way.

use std::collections::HashMap;

use async_nats::jetstream::{self, AckKind};
use chat_proto::frame::ServerFrame;
use chat_proto::{Message, UserId};
use chat_runtime::{nats, telemetry};
use tracing::Instrument;

use crate::State;

/// Routes a batch: pushes to whoever is online, then acks every message.
pub(crate) async fn route_batch(state: &State, batch: Vec<jetstream::Message>) {
    let mut items = Vec::with_capacity(batch.len());
    for msg in batch {
        match serde_json::from_slice::<Message>(&msg.payload) {
            Ok(m) => items.push((msg, m)),
            // The store, which keeps every message of the in stream, dead-letters it.
            Err(e) => {
                tracing::warn!(error = %e, "undecodable message in the in stream; skipped");
                if let Err(e) = msg.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "cannot terminate a message");
                }
            }
        }
    }
    if items.is_empty() {
        return;
    }
    let sessions = session_counts(state, &items).await;
    let count = |user: UserId| {
        sessions
            .as_ref()
            .and_then(|s| s.get(&user).copied())
            .unwrap_or(0)
    };
    for (msg, m) in &items {
        let live = count(m.to) > 0;
        let span =
            tracing::info_span!("router.route", msg_id = %m.msg_id, from = m.from, to = m.to, live);
        telemetry::extract(msg.headers.as_ref(), &span);
        // The sending device itself counts: one session is that device alone; none at all
        // means presence is missing sessions (Redis restarted empty, or down), and then the
        // sender may have other devices that only this copy reaches before their next login.
        let copy = count(m.from) != 1;
        push(state, m, live, copy).instrument(span).await;
    }
    for (msg, _) in &items {
        if let Err(e) = msg.ack().await {
            tracing::warn!(error = %e, "cannot ack; the redelivery will repeat harmlessly");
        }
    }
}

/// The fast path: the message to the recipient's devices when any is online, and a copy to
/// the sender's other devices when there may be any.
async fn push(state: &State, m: &Message, live: bool, copy: bool) {
    let path = if live { "live" } else { "offline" };
    metrics::counter!("chat_router_messages_routed_total", "path" => path).increment(1);
    if !live && !copy {
        return;
    }
    let frame = ServerFrame::Message(m.clone());
    if live {
        nats::publish_json(&state.nats, state.subjects.user(m.to), &frame).await;
    }
    if copy {
        nats::publish_json(&state.nats, state.subjects.user(m.from), &frame).await;
    }
}

/// Live sessions of every recipient and sender in the batch; `None` when Redis is down, and
/// then every recipient counts as offline (the store's notice delivers) and every sender
/// gets the copy.
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
