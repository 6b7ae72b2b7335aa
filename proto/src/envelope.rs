//! Payloads the services exchange over NATS (JSON).
//!
//! The in stream carries [`crate::Message`] (status `sent`); the store stream carries the
//! same messages (it sources the in stream), [`StoreAck`], [`StoreRead`] and [`StoreSeen`];
//! user subjects carry [`crate::frame::ServerFrame`] JSON ready to push. Request/reply
//! operations pair a request type with a response type and wrap the response in [`Reply`].

use serde::{Deserialize, Serialize};

use crate::{ErrorBody, ErrorCode, Message, UserId};

/// A device of `user_id` received these messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreAck {
    pub user_id: UserId,
    pub msg_ids: Vec<String>,
}

/// `user_id` read every message from `peer` up to and including `up_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRead {
    pub user_id: UserId,
    pub peer: UserId,
    pub up_to: String,
}

/// `user_id` was last seen online at `last_seen` (ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSeen {
    pub user_id: UserId,
    pub last_seen: i64,
}

/// One live WebSocket session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Session {
    pub user_id: UserId,
    pub session_id: String,
}

/// A session opened on a gateway (request; the reply is an empty `Reply::Ok`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionUp {
    pub session: Session,
    pub gateway_id: String,
}

/// A session closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDown {
    pub session: Session,
}

/// A gateway's periodic statement of its live sessions; it keeps their presence alive and
/// rebuilds it after Redis lost it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub gateway_id: String,
    pub sessions: Vec<Session>,
}

/// Which of these users are online?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceQuery {
    pub user_ids: Vec<UserId>,
}

/// `online[i]` answers for `user_ids[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceAnswer {
    pub online: Vec<bool>,
}

/// A user as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub user_id: UserId,
    pub username: String,
    pub last_seen: Option<i64>,
}

/// Create an account, or check a password (`StoreOp::Register` / `StoreOp::Login`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// One user by id (`StoreOp::User`); answers `Option<UserInfo>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetUser {
    pub user_id: UserId,
}

/// Users whose name starts with `prefix`, case-insensitively, other than `exclude`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Search {
    pub prefix: String,
    pub limit: u32,
    pub exclude: UserId,
}

/// One row of the conversation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRow {
    pub peer: UserInfo,
    pub last_message: Message,
    pub unread: u64,
}

/// The conversations of a user, newest first (`StoreOp::Conversations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListConversations {
    pub user_id: UserId,
}

/// A page of one conversation's history (`StoreOp::History`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub user_id: UserId,
    pub peer: UserId,
    pub before: Option<String>,
    pub limit: u32,
}

/// Messages waiting for a user, after `after` in msg_id order (`StoreOp::Backlog`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    pub user_id: UserId,
    pub after: Option<String>,
    pub limit: u32,
}

/// A page of messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// The stored message a sender made with `client_id` (`StoreOp::LookupClientId`); answers
/// `Option<Message>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupClientId {
    pub from: UserId,
    pub client_id: String,
}

/// The users who share a conversation with `user_id` (`StoreOp::Peers`); answers `Vec<UserId>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    pub user_id: UserId,
}

/// The answer to a request: `{"ok": ...}` or `{"err": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Err(ErrorBody),
}

impl<T> Reply<T> {
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::Err(ErrorBody::new(code, message))
    }

    pub fn into_result(self) -> Result<T, ErrorBody> {
        match self {
            Reply::Ok(v) => Ok(v),
            Reply::Err(e) => Err(e),
        }
    }
}

impl<T> From<Result<T, ErrorBody>> for Reply<T> {
    fn from(r: Result<T, ErrorBody>) -> Self {
        match r {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_have_a_stable_shape() {
        let ok: Reply<u8> = Reply::Ok(1);
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ok":1}"#);
        let err: Reply<u8> = Reply::err(ErrorCode::UnknownUser, "no");
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"err":{"code":"unknown_user","message":"no"}}"#
        );
    }
}
