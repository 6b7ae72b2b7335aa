//! The store's consumer of the store stream: persist messages, delivery and read marks, last
//! seen. Each batch is written before any of it is acked; every step is idempotent, so a
//! redelivery after a crash changes nothing but may repeat a notice (devices de-dup by id).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chat_proto::envelope::{StoreAck, StoreRead, StoreSeen};
use chat_proto::frame::{ServerFrame, valid_msg_id};
use chat_proto::{Message, Status, StoreWork};
use chat_runtime::{nats, telemetry};
use tracing::Instrument;
use uuid::Uuid;

use crate::{State, messages, users};

/// How often a mark that names a message not stored yet is retried before it is dropped.
/// The message's write is normally milliseconds behind; a mark naming a message that never
/// existed would otherwise circle for ever.
const MAX_MARK_RETRIES: i64 = 20;
const MARK_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Delay before a batch that failed on the database is tried again.
const DB_RETRY_DELAY: Duration = Duration::from_secs(1);

/// One batch from the stream, sorted by kind.
#[derive(Default)]
struct Work {
    persist: Vec<(jetstream::Message, Uuid, Message)>,
    acks: Vec<(jetstream::Message, StoreAck)>,
    reads: Vec<(jetstream::Message, StoreRead)>,
    seen: Vec<(jetstream::Message, StoreSeen)>,
}

pub(crate) async fn handle_batch(state: &State, batch: Vec<jetstream::Message>) {
    let mut work = Work::default();
    for msg in batch {
        let kind = state.subjects.store_work_of(&msg.subject);
        let decoded = match kind {
            Some(StoreWork::Msg) => decode::<Message>(&msg)
                .and_then(|m| {
                    Uuid::try_parse(&m.msg_id)
                        .ok()
                        .filter(|_| valid_msg_id(&m.msg_id))
                        .map(|id| (id, m))
                })
                .map(|(id, m)| work.persist.push((msg.clone(), id, m))),
            Some(StoreWork::Ack) => {
                decode::<StoreAck>(&msg).map(|a| work.acks.push((msg.clone(), a)))
            }
            Some(StoreWork::Read) => {
                decode::<StoreRead>(&msg).map(|r| work.reads.push((msg.clone(), r)))
            }
            Some(StoreWork::Seen) => {
                decode::<StoreSeen>(&msg).map(|s| work.seen.push((msg.clone(), s)))
            }
            None => None,
        };
        if decoded.is_none() {
            let dead = state.subjects.dead_letter();
            nats::dead_letter(&state.nats, dead, &msg, "not a valid store work payload").await;
        }
    }
    // Messages first: a mark in the same batch may name one of them.
    persist(state, work.persist).await;
    for (msg, ack) in work.acks {
        mark_delivered(state, msg, ack).await;
    }
    for (msg, read) in work.reads {
        mark_read(state, msg, read).await;
    }
    for (msg, seen) in work.seen {
        match users::seen(&state.db, seen.user_id, seen.last_seen).await {
            Ok(()) => ack(&msg).await,
            Err(e) => retry_later(&msg, &e, DB_RETRY_DELAY).await,
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(msg: &jetstream::Message) -> Option<T> {
    serde_json::from_slice(&msg.payload).ok()
}

async fn ack(msg: &jetstream::Message) {
    if let Err(e) = msg.ack().await {
        // Not fatal: the work is durable, a redelivery will find it done.
        tracing::warn!(error = %e, "cannot ack");
    }
}

async fn retry_later(
    msg: &jetstream::Message,
    error: &(dyn std::fmt::Display + Sync),
    delay: Duration,
) {
    tracing::warn!(error = %error, "store work failed; redelivering later");
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "cannot nak");
    }
}

async fn persist(state: &State, items: Vec<(jetstream::Message, Uuid, Message)>) {
    if items.is_empty() {
        return;
    }
    let batch: Vec<(Uuid, Message)> = items.iter().map(|(_, id, m)| (*id, m.clone())).collect();
    let span = tracing::info_span!("store.write", messages = batch.len());
    let stored = match messages::persist(&state.db, &batch).instrument(span).await {
        Ok(s) => s,
        Err(e) => {
            for (msg, _, _) in &items {
                retry_later(msg, &e, DB_RETRY_DELAY).await;
            }
            return;
        }
    };
    for ((msg, _, mut m), stored) in items.into_iter().zip(stored) {
        let span =
            tracing::info_span!("store.persist", msg_id = %m.msg_id, from = m.from, to = m.to);
        telemetry::extract(msg.headers.as_ref(), &span);
        async {
            if stored {
                // The "stored" notice: the sure path to every device of both users.
                m.status = Status::Sent;
                let frame = ServerFrame::Message(m.clone());
                nats::publish_json(&state.nats, state.subjects.user(m.to), &frame).await;
                nats::publish_json(&state.nats, state.subjects.user(m.from), &frame).await;
            } else {
                tracing::warn!("a retry of an already stored client_id came after the de-dup window; not written again");
            }
            ack(&msg).await;
        }
        .instrument(span)
        .await;
    }
}

/// Whether to retry a mark naming messages not stored yet, or give up on it.
async fn missing(msg: &jetstream::Message, what: &str) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if delivered < MAX_MARK_RETRIES {
        let _ = msg.ack_with(AckKind::Nak(Some(MARK_RETRY_DELAY))).await;
    } else {
        tracing::warn!(
            what,
            "a mark names messages that were never stored; dropped"
        );
        let _ = msg.ack_with(AckKind::Term).await;
    }
}

async fn mark_delivered(state: &State, msg: jetstream::Message, req: StoreAck) {
    let span = tracing::info_span!("store.delivered", user_id = req.user_id);
    telemetry::extract(msg.headers.as_ref(), &span);
    async {
        let ids: Vec<Uuid> = req
            .msg_ids
            .iter()
            .filter_map(|id| messages::parse_id(id))
            .collect();
        if ids.is_empty() {
            return ack(&msg).await;
        }
        match messages::deliver(&state.db, req.user_id, &ids).await {
            Err(e) => retry_later(&msg, &e, DB_RETRY_DELAY).await,
            Ok(marked) => {
                for (id, sender) in marked.receipts {
                    let frame = ServerFrame::Receipt {
                        msg_id: id.hyphenated().to_string(),
                        peer: req.user_id,
                        status: Status::Delivered,
                    };
                    nats::publish_json(&state.nats, state.subjects.user(sender), &frame).await;
                }
                if marked.missing > 0 {
                    missing(&msg, "ack").await;
                } else {
                    ack(&msg).await;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

async fn mark_read(state: &State, msg: jetstream::Message, req: StoreRead) {
    let span = tracing::info_span!("store.read", user_id = req.user_id, peer = req.peer);
    telemetry::extract(msg.headers.as_ref(), &span);
    async {
        let Some(up_to) = messages::parse_id(&req.up_to) else {
            return ack(&msg).await;
        };
        match messages::read(&state.db, req.user_id, req.peer, up_to).await {
            Err(e) => retry_later(&msg, &e, DB_RETRY_DELAY).await,
            Ok(None) => missing(&msg, "read").await,
            Ok(Some(())) => {
                let frame = ServerFrame::Receipt {
                    msg_id: req.up_to.clone(),
                    peer: req.user_id,
                    status: Status::Read,
                };
                nats::publish_json(&state.nats, state.subjects.user(req.peer), &frame).await;
                ack(&msg).await;
            }
        }
    }
    .instrument(span)
    .await;
}
