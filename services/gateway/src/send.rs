//! What a client sends, published in the order it was sent.
//!
//! One task per connection takes the client's `send`, `ack`, `read` and `typing` frames in
//! order. A `send` is published to the in stream with `Nats-Msg-Id: <sender>:<client_id>`
//! (JetStream's de-duplication) and answered `sent` only once JetStream has it on disk; many
//! publishes are in flight at once, and the answers come back in the order of the frames.
//! A retried `client_id` gets the first message's id back.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishAckFuture;
use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_proto::envelope::{LookupClientId, StoreAck, StoreRead};
use chat_proto::frame::{self, ServerFrame};
use chat_proto::{ErrorCode, Message, Status, StoreOp, StoreWork, UserId};
use chat_runtime::{nats, telemetry};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::AppState;
use crate::meters;

/// A validated client frame on its way out.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Send { id: Uuid, send: frame::Send },
    Ack { msg_ids: Vec<String> },
    Read { peer: UserId, up_to: String },
    Typing { to: UserId },
}

impl Outgoing {
    pub(crate) fn client_id(&self) -> Option<String> {
        match self {
            Outgoing::Send { send, .. } => Some(send.client_id.clone()),
            _ => None,
        }
    }
}

/// An answer to come, once JetStream confirms.
type Pending = Pin<Box<dyn Future<Output = Option<ServerFrame>> + Send>>;

pub(crate) async fn run(
    state: AppState,
    user: UserId,
    mut rx: mpsc::Receiver<Outgoing>,
    out: flume::Sender<WsMessage>,
) {
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    loop {
        tokio::select! {
            Some(answer) = pending.next(), if !pending.is_empty() => {
                if let Some(frame) = answer {
                    meters::frame_out(&frame);
                    // Waits for room: a client that never reads is dropped by the connection
                    // loop (its next push finds the queue full), which ends this task too.
                    let text = WsMessage::Text(Utf8Bytes::from(frame.to_json()));
                    if out.send_async(text).await.is_err() {
                        break;
                    }
                }
            }
            item = rx.recv() => match item {
                None => break,
                Some(item) => pending.push_back(handle(&state, user, item).await),
            },
        }
    }
}

fn ready(frame: Option<ServerFrame>) -> Pending {
    Box::pin(std::future::ready(frame))
}

fn internal(client_id: Option<String>) -> Option<ServerFrame> {
    Some(ServerFrame::error(
        ErrorCode::Internal,
        "not accepted; retry with the same client_id",
        client_id,
    ))
}

async fn handle(state: &AppState, user: UserId, item: Outgoing) -> Pending {
    match item {
        Outgoing::Send { id, send } => {
            // The root of the message's trace (not a child of the long-lived connection span).
            let span = tracing::info_span!(parent: None, "gateway.send", msg_id = %id, from = user, to = send.to);
            accept(state, user, id, send).instrument(span).await
        }
        Outgoing::Typing { to } => {
            if let Some(refusal) = unknown(state, to, None).await {
                return ready(refusal);
            }
            let frame = ServerFrame::Typing { from: user };
            nats::publish_json(&state.nats, state.subjects.user(to), &frame).await;
            ready(None)
        }
        Outgoing::Ack { msg_ids } => {
            let span = tracing::info_span!("gateway.ack", user_id = user);
            let ack = StoreAck {
                user_id: user,
                msg_ids,
            };
            store_work(state, StoreWork::Ack, &ack)
                .instrument(span)
                .await
        }
        Outgoing::Read { peer, up_to } => {
            if let Some(refusal) = unknown(state, peer, None).await {
                return ready(refusal);
            }
            let span = tracing::info_span!("gateway.read", user_id = user, peer);
            let read = StoreRead {
                user_id: user,
                peer,
                up_to,
            };
            store_work(state, StoreWork::Read, &read)
                .instrument(span)
                .await
        }
    }
}

/// `Some(error frame)` when `to` is not a user (or that cannot be known now).
async fn unknown(
    state: &AppState,
    to: UserId,
    client_id: Option<&str>,
) -> Option<Option<ServerFrame>> {
    match state.user_exists(to).await {
        Ok(true) => None,
        Ok(false) => Some(Some(ServerFrame::error(
            ErrorCode::UnknownRecipient,
            format!("there is no user {to}"),
            client_id.map(str::to_owned),
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the recipient");
            Some(internal(client_id.map(str::to_owned)))
        }
    }
}

/// Delivery and read marks go to the store stream; the client is answered nothing, and a
/// failure is only logged (the client's next ack or read covers it; unacked messages replay).
async fn store_work<T: Serialize>(state: &AppState, work: StoreWork, value: &T) -> Pending {
    let payload = match serde_json::to_vec(value) {
        Ok(p) => p,
        Err(_) => return ready(None),
    };
    let publish = state
        .js
        .publish_with_headers(
            state.subjects.store(work),
            telemetry::headers(),
            payload.into(),
        )
        .await;
    match publish {
        Ok(ack) => Box::pin(async move {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "a mark was not confirmed by JetStream");
            }
            None
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish a mark");
            ready(None)
        }
    }
}

async fn accept(state: &AppState, user: UserId, id: Uuid, send: frame::Send) -> Pending {
    if let Some(refusal) = unknown(state, send.to, Some(&send.client_id)).await {
        return ready(refusal);
    }
    let message = Message {
        msg_id: id.hyphenated().to_string(),
        from: user,
        to: send.to,
        body: send.body,
        ts: chat_proto::now_ms(),
        client_id: send.client_id,
        status: Status::Sent,
    };
    let payload = match serde_json::to_vec(&message) {
        Ok(p) => p,
        Err(_) => return ready(internal(Some(message.client_id))),
    };
    let headers = nats::dedup_headers(&format!("{user}:{}", message.client_id));
    let publish = state
        .js
        .publish_with_headers(state.subjects.inbound(), headers, payload.into())
        .await;
    let state = state.clone();
    let span = tracing::Span::current();
    match publish {
        Ok(ack) => Box::pin(confirm(state, message, ack).instrument(span)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish a message");
            ready(internal(Some(message.client_id)))
        }
    }
}

/// Waits for JetStream to hold the message, then answers `sent` (with the first message's id
/// and time when this was a retry).
async fn confirm(state: AppState, message: Message, ack: PublishAckFuture) -> Option<ServerFrame> {
    let ack = match ack.await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "JetStream did not confirm a message");
            return internal(Some(message.client_id));
        }
    };
    let (msg_id, ts) = if ack.duplicate {
        // Boxed: the retry's lookup is a large future, and held inline it would make every
        // message's boxed `Pending` a large allocation (glibc then consolidates its free
        // lists on each one: ~2 % of the gateway's samples under load, `perf`).
        match Box::pin(original(&state, &message, ack.sequence)).await {
            Some(first) => (first.msg_id, first.ts),
            None => return internal(Some(message.client_id)),
        }
    } else {
        meters::accepted();
        (message.msg_id, message.ts)
    };
    Some(ServerFrame::Sent {
        client_id: message.client_id,
        msg_id,
        ts,
    })
}

/// The first message sent with this client id: still in the in stream if the router has not
/// taken it yet, else in the store (where it may take a moment to land).
async fn original(state: &AppState, retry: &Message, sequence: u64) -> Option<Message> {
    if let Ok(raw) = state.in_stream.get_raw_message(sequence).await
        && let Ok(first) = serde_json::from_slice::<Message>(&raw.payload)
        && first.from == retry.from
        && first.client_id == retry.client_id
    {
        return Some(first);
    }
    let lookup = LookupClientId {
        from: retry.from,
        client_id: retry.client_id.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut wait = Duration::from_millis(20);
    while Instant::now() < deadline {
        match state
            .store::<_, Option<Message>>(StoreOp::LookupClientId, &lookup)
            .await
        {
            Ok(Some(first)) => return Some(first),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot look up a retried client_id"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
    tracing::warn!(client_id = %retry.client_id, "retried message not found");
    None
}
