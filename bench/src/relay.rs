//! The bare relay: the least a server must do for this workload, to measure the machine's
//! limit with the same load tool. It speaks the part of PROTOCOL.md the scenarios use —
//! register, login, `/ws` with `hello` and `backlog_done`, `send` answered by `sent` and
//! pushed as `message`, `ack`, `ping` — on the same axum and WebSocket settings and the same
//! socket writer as the gateway (`chat_gateway::socket`), and nothing else: no NATS, no
//! storage, no presence, nothing survives a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Result;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

/// Frames queued for one socket (as the gateway's default).
const OUTBOUND_QUEUE: usize = 4096;

/// A user's open sockets: session id and outbound queue.
type Sockets = Vec<(u64, flume::Sender<Message>)>;

#[derive(Default)]
struct Relay {
    next_user: AtomicI64,
    users: RwLock<HashMap<String, i64>>,
    sessions: RwLock<HashMap<i64, Sockets>>,
    next_session: AtomicU64,
}

pub async fn serve(listen: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("bare relay serving on http://{}", listener.local_addr()?);
    // Small frames must not wait for Nagle's algorithm (as the gateway).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new()
        .route("/api/v1/register", post(register))
        .route("/api/v1/login", post(login))
        .route("/api/v1/me", get(me))
        .route("/ws", get(upgrade))
        .with_state(Arc::new(Relay::default()));
    axum::serve(listener, app).await?;
    Ok(())
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
}

async fn register(State(relay): State<Arc<Relay>>, Json(c): Json<Credentials>) -> Response {
    let id = relay.next_user.fetch_add(1, Ordering::Relaxed) + 1;
    relay
        .users
        .write()
        .expect("users lock")
        .insert(c.username.clone(), id);
    (
        StatusCode::CREATED,
        Json(json!({"user_id": id, "username": c.username})),
    )
        .into_response()
}

async fn login(State(relay): State<Arc<Relay>>, Json(c): Json<Credentials>) -> Response {
    match relay.users.read().expect("users lock").get(&c.username) {
        Some(&id) => Json(json!({
            "token": id.to_string(), "user_id": id, "username": c.username, "expires_at": 0
        }))
        .into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// The relay's "token" is the user id itself: it checks nothing.
fn user_of(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<i64> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer
        .or(query.get("token").map(String::as_str))?
        .parse()
        .ok()
}

async fn me(headers: HeaderMap) -> Response {
    match user_of(&headers, &HashMap::new()) {
        Some(id) => Json(json!({"user_id": id})).into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn upgrade(
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    State(relay): State<Arc<Relay>>,
) -> Response {
    let Some(user) = user_of(&headers, &query) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    chat_gateway::socket::configure(ws).on_upgrade(move |socket| session(relay, user, socket))
}

async fn session(relay: Arc<Relay>, user: i64, socket: WebSocket) {
    let id = relay.next_session.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = chat_gateway::socket::queue(OUTBOUND_QUEUE);
    relay
        .sessions
        .write()
        .expect("sessions lock")
        .entry(user)
        .or_default()
        .push((id, tx.clone()));
    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(chat_gateway::socket::write_loop(sink, rx));
    let _ = tx.try_send(text(json!({"type": "hello", "user_id": user, "session_id": id.to_string(), "server_time": now_ms()})));
    let _ = tx.try_send(text(json!({"type": "backlog_done", "count": 0})));
    while let Some(Ok(frame)) = stream.next().await {
        let Message::Text(frame) = frame else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<Value>(&frame) else {
            continue;
        };
        match frame["type"].as_str() {
            Some("send") => relay.send(user, &frame, &tx),
            Some("ping") => {
                let _ = tx.try_send(text(json!({"type": "pong"})));
            }
            _ => {}
        }
    }
    writer.abort();
    let mut sessions = relay.sessions.write().expect("sessions lock");
    if let Some(list) = sessions.get_mut(&user) {
        list.retain(|(s, _)| *s != id);
    }
}

impl Relay {
    fn send(&self, from: i64, frame: &Value, reply: &flume::Sender<Message>) {
        let (Some(to), Some(client_id), Some(body)) = (
            frame["to"].as_i64(),
            frame["client_id"].as_str(),
            frame["body"].as_str(),
        ) else {
            return;
        };
        let msg_id = uuid::Uuid::now_v7().to_string();
        let ts = now_ms();
        let message = text(json!({
            "type": "message", "msg_id": msg_id, "from": from, "to": to, "body": body,
            "ts": ts, "client_id": client_id, "status": "sent"
        }));
        if let Some(list) = self.sessions.read().expect("sessions lock").get(&to) {
            for (_, tx) in list {
                let _ = tx.try_send(message.clone());
            }
        }
        let _ = reply.try_send(text(
            json!({"type": "sent", "client_id": client_id, "msg_id": msg_id, "ts": ts}),
        ));
    }
}

fn text(value: Value) -> Message {
    Message::text(value.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
