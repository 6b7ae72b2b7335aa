//! The HTTP API of PROTOCOL.md (`/api/v1/...`) and the health endpoints.

use axum::Json;
use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chat_proto::envelope::{
    ConversationRow, Credentials, GetUser, History, ListConversations, Page, Search, UserInfo,
};
use chat_proto::frame::valid_msg_id;
use chat_proto::limits::{PAGE_DEFAULT, PAGE_MAX};
use chat_proto::{ErrorCode, StoreOp, UserId};
use chat_runtime::ops;
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;

type ApiResult = Result<Response, ApiError>;

fn credentials(body: &Bytes) -> Result<Credentials, ApiError> {
    serde_json::from_slice(body).map_err(|_| {
        ApiError::bad_request(
            "the body must be JSON: {\"username\": \"...\", \"password\": \"...\"}",
        )
    })
}

pub(crate) async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> ApiResult {
    state.auth_limits.address(peer.ip())?;
    let creds = credentials(&body)?;
    let user: UserInfo = state.store(StoreOp::Register, &creds).await?;
    let body = json!({ "user_id": user.user_id, "username": user.username });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(crate) async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> ApiResult {
    state.auth_limits.address(peer.ip())?;
    let creds = credentials(&body)?;
    state.auth_limits.login(&creds.username)?;
    let user: UserInfo = state.store(StoreOp::Login, &creds).await?;
    let (token, expires_at) = state.tokens.issue(user.user_id);
    Ok(Json(json!({
        "token": token,
        "user_id": user.user_id,
        "username": user.username,
        "expires_at": expires_at,
    }))
    .into_response())
}

pub(crate) async fn me(State(state): State<AppState>, AuthUser(me): AuthUser) -> ApiResult {
    let user: Option<UserInfo> = state.store(StoreOp::User, &GetUser { user_id: me }).await?;
    let user = user
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "the token's user does not exist"))?;
    Ok(Json(json!({ "user_id": user.user_id, "username": user.username })).into_response())
}

#[derive(Deserialize)]
pub(crate) struct SearchQuery {
    #[serde(default)]
    q: String,
    limit: Option<u32>,
}

fn page_limit(limit: Option<u32>) -> u32 {
    limit.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX)
}

pub(crate) async fn users(
    State(state): State<AppState>,
    AuthUser(me): AuthUser,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let search = Search {
        prefix: query.q,
        limit: page_limit(query.limit),
        exclude: me,
    };
    let found: Vec<UserInfo> = state.store(StoreOp::Search, &search).await?;
    let ids: Vec<UserId> = found.iter().map(|u| u.user_id).collect();
    let online = state.online(&ids).await;
    let users: Vec<_> = found
        .into_iter()
        .zip(online)
        .map(
            |(u, online)| json!({ "user_id": u.user_id, "username": u.username, "online": online }),
        )
        .collect();
    Ok(Json(json!({ "users": users })).into_response())
}

pub(crate) async fn conversations(
    State(state): State<AppState>,
    AuthUser(me): AuthUser,
) -> ApiResult {
    let rows: Vec<ConversationRow> = state
        .store(StoreOp::Conversations, &ListConversations { user_id: me })
        .await?;
    let ids: Vec<UserId> = rows.iter().map(|r| r.peer.user_id).collect();
    let online = state.online(&ids).await;
    let conversations: Vec<_> = rows
        .into_iter()
        .zip(online)
        .map(|(r, online)| {
            json!({
                "peer": {
                    "user_id": r.peer.user_id,
                    "username": r.peer.username,
                    "online": online,
                    "last_seen": r.peer.last_seen,
                },
                "last_message": r.last_message,
                "unread": r.unread,
            })
        })
        .collect();
    Ok(Json(json!({ "conversations": conversations })).into_response())
}

#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    before: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn history(
    State(state): State<AppState>,
    AuthUser(me): AuthUser,
    peer: Result<Path<UserId>, axum::extract::rejection::PathRejection>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Path(peer) = peer.map_err(|_| ApiError::bad_request("the peer id must be an integer"))?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(before) = &query.before
        && !valid_msg_id(before)
    {
        return Err(ApiError::bad_request("before must be a message id"));
    }
    let req = History {
        user_id: me,
        peer,
        before: query.before,
        limit: page_limit(query.limit),
    };
    let page: Page = state.store(StoreOp::History, &req).await?;
    Ok(Json(page).into_response())
}

/// Ready when NATS is connected and the in stream answers.
pub(crate) fn readiness(state: &AppState) -> ops::Readiness {
    ops::readiness(state.clone(), |state| async move {
        let stream = ops::probe("jetstream", async {
            state
                .js
                .get_stream(state.subjects.in_stream())
                .await
                .map(drop)
        })
        .await;
        let events = ops::Check {
            backend: "nats-events",
            ok: state.events.is_connected(),
        };
        vec![ops::nats_check(&state.nats), events, stream]
    })
}
