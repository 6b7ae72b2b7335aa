//! The store's consumer of the store stream: persist messages, delivery and read marks, last
//! seen. Each batch is written before any of it is acked; every step is idempotent, so a
//! redelivery after a crash changes nothing but may repeat a notice (devices de-dup by id).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chat_proto::envelope::{StoreAck, StoreRead, StoreSeen};
use chat_proto::frame::{ServerFrame, valid_msg_id};
use chat_proto::{Message, Status, StoreWork};
use chat_runtime::{nats, ops, telemetry};
use tracing::Instrument;
use uuid::Uuid;

use crate::{State, messages, users};

/// How long a mark that names a message not stored yet keeps being retried before it is
/// dropped. The message's write is normally milliseconds behind (or, after a database outage,
/// seconds); a mark naming a message that never existed would otherwise circle for ever. A
/// dropped delivery mark costs a repeat of the message in the next backlog, which devices
/// de-dup by id.
const MARK_PATIENCE: Duration = Duration::from_secs(60);
/// The histogram of database write latency.
const DB: &str = "chat_db_seconds";
/// Redelivery delays of work that failed: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

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
        // Each message is decoded, then moved into its kind's list; what cannot be read is
        // dead-lettered.
        match state.subjects.store_work_of(&msg.subject) {
            Some(StoreWork::Msg) => {
                let valid = decode::<Message>(&msg).and_then(|m| {
                    let id = Uuid::try_parse(&m.msg_id).ok()?;
                    valid_msg_id(&m.msg_id).then_some((id, m))
                });
                if let Some((id, m)) = valid {
                    work.persist.push((msg, id, m));
                    continue;
                }
            }
            Some(StoreWork::Ack) => {
                if let Some(a) = decode::<StoreAck>(&msg) {
                    work.acks.push((msg, a));
                    continue;
                }
            }
            Some(StoreWork::Read) => {
                if let Some(r) = decode::<StoreRead>(&msg) {
                    work.reads.push((msg, r));
                    continue;
                }
            }
            Some(StoreWork::Seen) => {
                if let Some(s) = decode::<StoreSeen>(&msg) {
                    work.seen.push((msg, s));
                    continue;
                }
            }
            None => {}
        }
        let dead = state.subjects.dead_letter();
        nats::dead_letter(&state.nats, dead, &msg, "not a valid store work payload").await;
    }
    write(state, work.persist, work.acks).await;
    for (msg, read) in work.reads {
        mark_read(state, msg, read).await;
    }
    if !work.seen.is_empty() {
        let times: Vec<_> = work
            .seen
            .iter()
            .map(|(_, s)| (s.user_id, s.last_seen))
            .collect();
        match ops::timed(DB, "seen", users::seen(&state.db, &times)).await {
            Ok(()) => {
                for (msg, _) in &work.seen {
                    ack(msg).await;
                }
            }
            Err(e) => {
                for (msg, _) in &work.seen {
                    retry_later(msg, &e).await;
                }
            }
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

/// Gives the work back to JetStream for a later try, waiting longer each time it fails (a
/// database outage must not turn into a redelivery storm).
async fn retry_later(msg: &jetstream::Message, error: &(dyn std::fmt::Display + Sync)) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let delay = backoff(delivered);
    tracing::warn!(error = %error, delivered, ?delay, "store work failed; redelivering later");
    metrics::counter!("chat_store_retries_total").increment(1);
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "cannot nak");
    }
}

/// The delay before the next try of work delivered `delivered` times.
fn backoff(delivered: i64) -> Duration {
    // Zero or less (never sent by JetStream) counts as the first try; huge counts as many.
    let doublings = u32::try_from(delivered.saturating_sub(1).max(0))
        .unwrap_or(u32::MAX)
        .min(16);
    (RETRY_FIRST * 2u32.pow(doublings)).min(RETRY_MAX)
}

/// The batch's messages and delivery marks in one transaction (see [`messages::write`]);
/// then the "stored" notices and the receipts, and each is acked, or given back if it failed
/// or names a message not stored yet.
async fn write(
    state: &State,
    items: Vec<(jetstream::Message, Uuid, Message)>,
    marks: Vec<(jetstream::Message, StoreAck)>,
) {
    if items.is_empty() && marks.is_empty() {
        return;
    }
    let batch: Vec<(Uuid, &Message)> = items.iter().map(|(_, id, m)| (*id, m)).collect();
    let wanted: Vec<(chat_proto::UserId, Vec<Uuid>)> = marks
        .iter()
        .map(|(_, req)| {
            let ids = req
                .msg_ids
                .iter()
                .filter_map(|id| messages::parse_id(id))
                .collect();
            (req.user_id, ids)
        })
        .collect();
    let span = tracing::info_span!("store.write", messages = batch.len(), marks = wanted.len());
    let written = match ops::timed(DB, "write", messages::write(&state.db, &batch, &wanted))
        .instrument(span)
        .await
    {
        Ok(written) => written,
        Err(e) => {
            let all = items.iter().map(|(msg, _, _)| msg);
            for msg in all.chain(marks.iter().map(|(msg, _)| msg)) {
                retry_later(msg, &e).await;
            }
            return;
        }
    };
    announce_stored(state, items, written.stored).await;
    announce_delivered(state, marks, written.marked).await;
}

/// Sends each stored message's "stored" notice, then acks it.
async fn announce_stored(
    state: &State,
    items: Vec<(jetstream::Message, Uuid, Message)>,
    stored: Vec<bool>,
) {
    for ((msg, _, mut m), stored) in items.into_iter().zip(stored) {
        let span =
            tracing::info_span!("store.persist", msg_id = %m.msg_id, from = m.from, to = m.to);
        telemetry::extract(msg.headers.as_ref(), &span);
        async {
            if stored {
                metrics::counter!("chat_store_messages_stored_total").increment(1);
                // The "stored" notice: the sure path to every device of the recipient. The
                // sender's other devices have the router's copy (or, when no router ran, the
                // message in their history).
                m.status = Status::Sent;
                let subject = state.subjects.user(m.to);
                nats::publish_json(&state.nats, subject, &ServerFrame::Message(m)).await;
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
async fn missing(msg: &jetstream::Message, what: &'static str) {
    let info = msg.info().ok();
    let delivered = info.as_ref().map_or(1, |i| i.delivered);
    let published = info.map_or(time::OffsetDateTime::UNIX_EPOCH, |i| i.published);
    let age = time::OffsetDateTime::now_utc() - published;
    if age < MARK_PATIENCE {
        metrics::counter!("chat_store_marks_early_total", "mark" => what).increment(1);
        let _ = msg.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
    } else {
        tracing::warn!(
            what,
            "a mark names messages that were never stored; dropped"
        );
        let _ = msg.ack_with(AckKind::Term).await;
    }
}

/// Sends each delivery mark's receipts, then acks it, or gives it back if it names a message
/// not stored yet.
async fn announce_delivered(
    state: &State,
    marks: Vec<(jetstream::Message, StoreAck)>,
    marked: Vec<messages::Marked>,
) {
    for ((msg, req), marked) in marks.into_iter().zip(marked) {
        let span = tracing::info_span!("store.delivered", user_id = req.user_id);
        telemetry::extract(msg.headers.as_ref(), &span);
        async {
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
        .instrument(span)
        .await;
    }
}

async fn mark_read(state: &State, msg: jetstream::Message, req: StoreRead) {
    let span = tracing::info_span!("store.read", user_id = req.user_id, peer = req.peer);
    telemetry::extract(msg.headers.as_ref(), &span);
    async {
        let Some(up_to) = messages::parse_id(&req.up_to) else {
            return ack(&msg).await;
        };
        match ops::timed(
            DB,
            "read",
            messages::read(&state.db, req.user_id, req.peer, up_to),
        )
        .await
        {
            Err(e) => retry_later(&msg, &e).await,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<Duration> = (1..=8).map(super::backoff).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(super::backoff(i64::MAX), super::RETRY_MAX);
        assert_eq!(super::backoff(0), super::RETRY_FIRST);
    }
}
