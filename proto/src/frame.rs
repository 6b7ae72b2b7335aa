//! WebSocket frames of PROTOCOL.md.
//!
//! Server frames are one serde enum. Client frames are parsed by [`parse_client_frame`], which
//! validates as it goes so that every way a frame can be wrong maps to the protocol's code:
//! `unknown_type` for a type we do not know, `empty_body` / `body_too_long` for the body,
//! `bad_request` for everything else.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_ACK_IDS, MAX_BODY_CHARS, MAX_CLIENT_ID_CHARS};
use crate::{ErrorCode, Message, Status, UserId};

/// A frame from the server to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Hello {
        user_id: UserId,
        session_id: String,
        server_time: i64,
    },
    Message(Message),
    BacklogDone {
        count: u64,
    },
    Sent {
        client_id: String,
        msg_id: String,
        ts: i64,
    },
    Receipt {
        msg_id: String,
        peer: UserId,
        status: Status,
    },
    Presence {
        user_id: UserId,
        online: bool,
        last_seen: Option<i64>,
    },
    Typing {
        from: UserId,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
}

impl ServerFrame {
    pub fn error(code: ErrorCode, message: impl Into<String>, client_id: Option<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            client_id,
        }
    }

    /// The frame's `type` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Hello { .. } => "hello",
            ServerFrame::Message(_) => "message",
            ServerFrame::BacklogDone { .. } => "backlog_done",
            ServerFrame::Sent { .. } => "sent",
            ServerFrame::Receipt { .. } => "receipt",
            ServerFrame::Presence { .. } => "presence",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Pong => "pong",
            ServerFrame::Error { .. } => "error",
        }
    }

    /// The JSON text of the frame.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys, no custom impls.
        serde_json::to_string(self).expect("server frames always serialise")
    }
}

/// A `send` frame, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub client_id: String,
    pub to: UserId,
    pub body: String,
}

/// A frame from a client, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Send(Send),
    Ack { msg_ids: Vec<String> },
    Read { peer: UserId, up_to: String },
    Typing { to: UserId },
    Ping,
}

impl ClientFrame {
    /// The frame's `type` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Send(_) => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Ping => "ping",
        }
    }
}

/// Why a client frame was refused, ready to become an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// Set when the frame was a `send` whose `client_id` could be read.
    pub client_id: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, client_id: Option<&str>) -> Self {
        FrameError {
            code,
            message: message.into(),
            client_id: client_id.map(str::to_owned),
        }
    }

    pub fn into_frame(self) -> ServerFrame {
        ServerFrame::error(self.code, self.message, self.client_id)
    }
}

#[derive(Deserialize)]
struct RawSend {
    client_id: String,
    to: UserId,
    body: String,
}

#[derive(Deserialize)]
struct RawAck {
    msg_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawRead {
    peer: UserId,
    up_to: String,
}

#[derive(Deserialize)]
struct RawTyping {
    to: UserId,
}

/// Whether `id` has the shape of a message id (a hyphenated lowercase UUID).
pub fn valid_msg_id(id: &str) -> bool {
    id.len() == 36
        && uuid::Uuid::try_parse(id).is_ok()
        && !id.bytes().any(|b| b.is_ascii_uppercase())
}

/// Parses and validates one text frame from a client. Unknown fields (a `from`, say) are
/// ignored: the sender is always the authenticated user.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let bad = |m: String| FrameError::new(ErrorCode::BadRequest, m, None);
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    // Read in place: the frame's value is then taken apart by its type, not copied.
    let Some(kind) = value.get("type").and_then(serde_json::Value::as_str) else {
        return Err(bad("a frame is a JSON object with a string \"type\"".into()));
    };
    match kind {
        "send" => parse_send(value),
        "ack" => {
            let RawAck { msg_ids } = fields(value, None)?;
            if msg_ids.is_empty() || msg_ids.len() > MAX_ACK_IDS {
                return Err(bad(format!("msg_ids holds 1 to {MAX_ACK_IDS} ids")));
            }
            if let Some(id) = msg_ids.iter().find(|id| !valid_msg_id(id)) {
                return Err(bad(format!("{id:?} is not a message id")));
            }
            Ok(ClientFrame::Ack { msg_ids })
        }
        "read" => {
            let RawRead { peer, up_to } = fields(value, None)?;
            if !valid_msg_id(&up_to) {
                return Err(bad(format!("{up_to:?} is not a message id")));
            }
            Ok(ClientFrame::Read { peer, up_to })
        }
        "typing" => {
            let RawTyping { to } = fields(value, None)?;
            Ok(ClientFrame::Typing { to })
        }
        "ping" => Ok(ClientFrame::Ping),
        other => Err(FrameError::new(
            ErrorCode::UnknownType,
            format!("unknown frame type {other:?}"),
            None,
        )),
    }
}

fn parse_send(value: serde_json::Value) -> Result<ClientFrame, FrameError> {
    // Read the client_id first, so that every later error can name it.
    let client_id = value
        .get("client_id")
        .and_then(|c| c.as_str())
        .map(str::to_owned);
    let cid = client_id.as_deref();
    let RawSend {
        client_id,
        to,
        body,
    } = fields(value, cid)?;
    if client_id.is_empty() || client_id.chars().count() > MAX_CLIENT_ID_CHARS {
        return Err(FrameError::new(
            ErrorCode::BadRequest,
            format!("client_id holds 1 to {MAX_CLIENT_ID_CHARS} characters"),
            Some(&client_id),
        ));
    }
    if body.is_empty() {
        return Err(FrameError::new(
            ErrorCode::EmptyBody,
            "the body is empty",
            Some(&client_id),
        ));
    }
    if body.chars().count() > MAX_BODY_CHARS {
        return Err(FrameError::new(
            ErrorCode::BodyTooLong,
            format!("the body holds at most {MAX_BODY_CHARS} characters"),
            Some(&client_id),
        ));
    }
    Ok(ClientFrame::Send(Send {
        client_id,
        to,
        body,
    }))
}

fn fields<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    client_id: Option<&str>,
) -> Result<T, FrameError> {
    serde_json::from_value(value)
        .map_err(|e| FrameError::new(ErrorCode::BadRequest, e.to_string(), client_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client_frame(text).unwrap_err().code
    }

    #[test]
    fn parses_each_client_frame() {
        assert_eq!(
            parse_client_frame(r#"{"type":"send","client_id":"c1","to":2,"body":"hi","from":9}"#),
            Ok(ClientFrame::Send(Send {
                client_id: "c1".into(),
                to: 2,
                body: "hi".into()
            }))
        );
        let id = "0190b6a2-7c1e-7d3a-9f00-000000000001";
        assert_eq!(
            parse_client_frame(&format!(r#"{{"type":"ack","msg_ids":["{id}"]}}"#)),
            Ok(ClientFrame::Ack {
                msg_ids: vec![id.into()]
            })
        );
        assert_eq!(
            parse_client_frame(&format!(r#"{{"type":"read","peer":3,"up_to":"{id}"}}"#)),
            Ok(ClientFrame::Read {
                peer: 3,
                up_to: id.into()
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"typing","to":3}"#),
            Ok(ClientFrame::Typing { to: 3 })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
    }

    #[test]
    fn maps_each_defect_to_its_code() {
        assert_eq!(code("nope"), ErrorCode::BadRequest);
        assert_eq!(code("[]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"shout"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"send","client_id":"c","to":"x","body":"b"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"send","client_id":"c","to":2,"body":""}"#),
            ErrorCode::EmptyBody
        );
        let long = "é".repeat(MAX_BODY_CHARS + 1);
        let frame = format!(r#"{{"type":"send","client_id":"c","to":2,"body":"{long}"}}"#);
        let err = parse_client_frame(&frame).unwrap_err();
        assert_eq!(err.code, ErrorCode::BodyTooLong);
        assert_eq!(err.client_id.as_deref(), Some("c"));
        let exact = "é".repeat(MAX_BODY_CHARS);
        let frame = format!(r#"{{"type":"send","client_id":"c","to":2,"body":"{exact}"}}"#);
        assert!(parse_client_frame(&frame).is_ok());
        assert_eq!(
            code(r#"{"type":"ack","msg_ids":[]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"ack","msg_ids":["x"]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"read","peer":1,"up_to":"x"}"#),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn server_frames_have_the_wire_shape() {
        let frame = ServerFrame::Message(Message {
            msg_id: "m".into(),
            from: 1,
            to: 2,
            body: "b".into(),
            ts: 5,
            client_id: "c".into(),
            status: Status::Sent,
        });
        let json: serde_json::Value = serde_json::from_str(&frame.to_json()).unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["status"], "sent");
        assert_eq!(json["from"], 1);
        let pong: serde_json::Value = serde_json::from_str(&ServerFrame::Pong.to_json()).unwrap();
        assert_eq!(pong, serde_json::json!({"type": "pong"}));
        let done = ServerFrame::BacklogDone { count: 3 }.to_json();
        assert_eq!(done, r#"{"type":"backlog_done","count":3}"#);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
                prop_oneof![
                    Just("send"),
                    Just("ack"),
                    Just("read"),
                    Just("typing"),
                    Just("ping")
                ]
                .prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                    prop::collection::hash_map(
                        prop_oneof![
                            Just("type".to_owned()),
                            Just("to".to_owned()),
                            Just("body".to_owned()),
                            Just("client_id".to_owned()),
                            Just("msg_ids".to_owned()),
                            Just("peer".to_owned()),
                            Just("up_to".to_owned()),
                            ".{0,8}"
                        ],
                        inner,
                        0..8
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            /// Arbitrary text never panics the parser, and every refusal has a message.
            #[test]
            fn any_text_is_parsed_or_refused(text in ".{0,300}") {
                if let Err(e) = parse_client_frame(&text) {
                    prop_assert!(!e.message.is_empty());
                }
            }

            /// Arbitrary JSON shaped like frames: parsed into a frame that satisfies every
            /// limit, or refused with a protocol code.
            #[test]
            fn frame_shaped_json_is_validated(value in json_value()) {
                match parse_client_frame(&value.to_string()) {
                    Ok(ClientFrame::Send(s)) => {
                        prop_assert!(!s.body.is_empty() && s.body.chars().count() <= MAX_BODY_CHARS);
                        prop_assert!(!s.client_id.is_empty() && s.client_id.chars().count() <= MAX_CLIENT_ID_CHARS);
                    }
                    Ok(ClientFrame::Ack { msg_ids }) => {
                        prop_assert!(!msg_ids.is_empty() && msg_ids.len() <= MAX_ACK_IDS);
                        prop_assert!(msg_ids.iter().all(|id| valid_msg_id(id)));
                    }
                    Ok(ClientFrame::Read { up_to, .. }) => prop_assert!(valid_msg_id(&up_to)),
                    Ok(_) => {}
                    Err(e) => prop_assert!(matches!(
                        e.code,
                        ErrorCode::BadRequest | ErrorCode::UnknownType | ErrorCode::EmptyBody | ErrorCode::BodyTooLong
                    )),
                }
            }

            /// A valid send round-trips whatever its text.
            #[test]
            fn valid_sends_keep_their_text(client_id in ".{1,64}", body in ".{1,200}", to in any::<i64>()) {
                let frame = serde_json::json!({"type": "send", "client_id": client_id, "to": to, "body": body});
                let parsed = parse_client_frame(&frame.to_string());
                prop_assert_eq!(parsed, Ok(ClientFrame::Send(Send { client_id, to, body })));
            }
        }
    }
}
