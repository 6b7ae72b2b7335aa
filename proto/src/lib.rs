//! The single source of agreement between the chat services and their clients.
//!
//! Everything two parties must spell the same way lives here and nowhere else: the WebSocket
//! frames of PROTOCOL.md ([`frame`]), the payloads services exchange over NATS ([`envelope`]),
//! the NATS subjects, stream and consumer names and Redis key prefixes derived from the
//! namespace ([`Subjects`]), the limits ([`limits`]) and the error codes ([`ErrorCode`]).
//! The crate does no I/O and has no async code.

pub mod envelope;
pub mod frame;
pub mod limits;
pub mod subjects;

pub use subjects::{NamespaceError, StoreOp, StoreWork, Subjects};

use serde::{Deserialize, Serialize};

/// A user id, as on the wire: a JSON integer.
pub type UserId = i64;

/// Delivery state of a message, from the sender's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Durably accepted, not yet on any device of the recipient.
    Sent,
    /// A device of the recipient acknowledged it.
    Delivered,
    /// The recipient marked it read.
    Read,
}

impl Status {
    /// The value stored in the `messages.status` column.
    pub fn as_i16(self) -> i16 {
        match self {
            Status::Sent => 0,
            Status::Delivered => 1,
            Status::Read => 2,
        }
    }

    /// The inverse of [`Status::as_i16`]; anything unknown reads as `Sent`, the safe side
    /// (a message shown as not yet delivered is retried, never lost).
    pub fn from_i16(value: i16) -> Status {
        match value {
            1 => Status::Delivered,
            2 => Status::Read,
            _ => Status::Sent,
        }
    }
}

/// `MESSAGE` of PROTOCOL.md: one chat message as clients and services see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Server-assigned UUIDv7, lowercase and hyphenated; string order is conversation order.
    pub msg_id: String,
    pub from: UserId,
    pub to: UserId,
    pub body: String,
    /// Milliseconds since the Unix epoch when the gateway accepted it.
    pub ts: i64,
    /// The sender's idempotency key: a retried `send` reuses it.
    pub client_id: String,
    pub status: Status,
}

/// Error codes of PROTOCOL.md, shared by HTTP bodies, socket `error` frames and NATS replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    BodyTooLong,
    EmptyBody,
    UnknownRecipient,
    RateLimited,
    Internal,
    InvalidUsername,
    InvalidPassword,
    UsernameTaken,
    BadCredentials,
    Unauthorized,
    UnknownUser,
    NotReady,
}

impl ErrorCode {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BodyTooLong => "body_too_long",
            ErrorCode::EmptyBody => "empty_body",
            ErrorCode::UnknownRecipient => "unknown_recipient",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidUsername => "invalid_username",
            ErrorCode::InvalidPassword => "invalid_password",
            ErrorCode::UsernameTaken => "username_taken",
            ErrorCode::BadCredentials => "bad_credentials",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::NotReady => "not_ready",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code with the human text that goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// Milliseconds since the Unix epoch, the one timestamp unit of the protocol.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_wire_names() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::UnknownType,
            ErrorCode::BodyTooLong,
            ErrorCode::EmptyBody,
            ErrorCode::UnknownRecipient,
            ErrorCode::RateLimited,
            ErrorCode::Internal,
            ErrorCode::UsernameTaken,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn status_round_trips_through_its_column_value() {
        for s in [Status::Sent, Status::Delivered, Status::Read] {
            assert_eq!(Status::from_i16(s.as_i16()), s);
        }
    }
}
