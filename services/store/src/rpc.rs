//! The store's request/reply operations (`<ns>.rpc.store.*`, one queue group shared by every
//! replica): accounts, search, conversations, history, backlog, client-id lookup, peers.

use std::future::Future;

use chat_proto::envelope::{
    Backlog, Credentials, GetUser, History, ListConversations, LookupClientId, Peers, Reply, Search,
};
use chat_proto::limits::{BACKLOG_PAGE, PAGE_MAX};
use chat_proto::subjects::StoreOp;
use chat_proto::{ErrorBody, ErrorCode};
use chat_runtime::{nats, ops, telemetry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::Error;
use crate::{State, messages, users};

/// Requests handled at once by one store; more wait in the subscription.
const CONCURRENCY: usize = 64;

/// Answers requests until `cancel` fires; requests in hand are finished first.
pub(crate) async fn serve(state: State, sub: async_nats::Subscriber, cancel: CancellationToken) {
    nats::serve(sub, CONCURRENCY, cancel, move |msg| {
        handle(state.clone(), msg)
    })
    .await;
}

async fn handle(state: State, msg: async_nats::Message) {
    let Some(op) = state.subjects.rpc_op_of(&msg.subject) else {
        return;
    };
    let span = tracing::info_span!("store.rpc", op = ?op);
    telemetry::extract(msg.headers.as_ref(), &span);
    let db = &state.db;
    let work = async {
        match op {
            StoreOp::Register => {
                answer(&state, &msg, |r: Credentials| async move {
                    users::register(db, r).await
                })
                .await
            }
            StoreOp::Login => {
                answer(&state, &msg, |r: Credentials| async move {
                    users::login(db, r).await
                })
                .await
            }
            StoreOp::User => {
                answer(&state, &msg, |r: GetUser| async move {
                    Ok(Ok(users::get(db, r.user_id).await?))
                })
                .await
            }
            StoreOp::Search => {
                answer(&state, &msg, |mut r: Search| async move {
                    r.limit = r.limit.clamp(1, PAGE_MAX);
                    Ok(Ok(users::search(db, r).await?))
                })
                .await
            }
            StoreOp::Conversations => {
                answer(&state, &msg, |r: ListConversations| async move {
                    Ok(Ok(messages::conversations(db, r.user_id).await?))
                })
                .await
            }
            StoreOp::History => {
                answer(&state, &msg, |mut r: History| async move {
                    r.limit = r.limit.clamp(1, PAGE_MAX);
                    let before = match r.before.as_deref().map(messages::parse_id) {
                        None => None,
                        Some(Some(id)) => Some(id),
                        Some(None) => {
                            return Ok(Err(ErrorBody::new(
                                ErrorCode::BadRequest,
                                "before is not a message id",
                            )));
                        }
                    };
                    if users::get(db, r.peer).await?.is_none() {
                        return Ok(Err(ErrorBody::new(ErrorCode::UnknownUser, "no such user")));
                    }
                    Ok(Ok(messages::history(db, &r, before).await?))
                })
                .await
            }
            StoreOp::Backlog => {
                answer(&state, &msg, |r: Backlog| async move {
                    let after = r.after.as_deref().and_then(messages::parse_id);
                    Ok(Ok(messages::backlog(
                        db,
                        r.user_id,
                        after,
                        r.limit.clamp(1, BACKLOG_PAGE),
                    )
                    .await?))
                })
                .await
            }
            StoreOp::LookupClientId => {
                answer(&state, &msg, |r: LookupClientId| async move {
                    Ok(Ok(messages::by_client_id(db, r.from, &r.client_id).await?))
                })
                .await
            }
            StoreOp::Peers => {
                answer(&state, &msg, |r: Peers| async move {
                    Ok(Ok(messages::peers(db, r.user_id).await?))
                })
                .await
            }
        }
    };
    ops::timed("chat_store_rpc_seconds", op.as_str(), work)
        .instrument(span)
        .await;
}

/// Decodes the request, runs `f` and sends its reply. Bad input is answered `bad_request`;
/// a failure of the store itself is logged once and answered `internal`.
async fn answer<Req, Resp, F, Fut>(state: &State, msg: &async_nats::Message, f: F)
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Result<Resp, ErrorBody>, Error>>,
{
    let reply: Reply<Resp> = match serde_json::from_slice::<Req>(&msg.payload) {
        Err(e) => Reply::err(ErrorCode::BadRequest, format!("undecodable request: {e}")),
        Ok(req) => match f(req).await {
            Ok(result) => result.into(),
            Err(e) => Reply::Err(e.to_reply()),
        },
    };
    nats::respond(&state.nats, msg.reply.as_deref(), &reply).await;
}
