//! This gateway's live sessions: announced to the router when they open and close, and
//! restated by a heartbeat so that presence survives a Redis restart and a crashed gateway's
//! sessions expire.

use std::time::Duration;

use chat_proto::UserId;
use chat_proto::envelope::{Heartbeat, Session, SessionDown, SessionUp};
use chat_runtime::nats;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// Sessions per heartbeat message, to stay well under NATS's payload limit.
const HEARTBEAT_CHUNK: usize = 1000;
/// How long a new connection waits for the router to record its session.
const UP_TIMEOUT: Duration = Duration::from_secs(2);

impl AppState {
    /// Records the session and waits (bounded) for the router to have it, so live messages
    /// reach it from the start. On failure the heartbeat repairs it; the store's sure path
    /// delivers meanwhile.
    pub(crate) async fn session_up(&self, user: UserId, session_id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session_id.to_owned(), user);
        metrics::gauge!("chat_gateway_connections").increment(1.0);
        let up = SessionUp {
            session: Session {
                user_id: user,
                session_id: session_id.to_owned(),
            },
            gateway_id: self.gateway_id.clone(),
        };
        let answer: Result<(), _> = nats::request(
            &self.nats,
            "router",
            self.subjects.presence_up(),
            &up,
            UP_TIMEOUT,
        )
        .await;
        if let Err(e) = answer {
            tracing::warn!(error = %e, "router did not record the session; the heartbeat will");
        }
    }

    pub(crate) async fn session_down(&self, user: UserId, session_id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session_id);
        metrics::gauge!("chat_gateway_connections").decrement(1.0);
        let down = SessionDown {
            session: Session {
                user_id: user,
                session_id: session_id.to_owned(),
            },
        };
        nats::publish_json(&self.nats, self.subjects.presence_down(), &down).await;
    }

    fn live_sessions(&self) -> Vec<Session> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(session_id, user_id)| Session {
                user_id: *user_id,
                session_id: session_id.clone(),
            })
            .collect()
    }
}

/// Restates every live session every `every`, until `cancel` fires.
pub(crate) async fn heartbeat(state: AppState, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for chunk in state.live_sessions().chunks(HEARTBEAT_CHUNK) {
            let beat = Heartbeat {
                gateway_id: state.gateway_id.clone(),
                sessions: chunk.to_vec(),
            };
            nats::publish_json(&state.nats, state.subjects.presence_heartbeat(), &beat).await;
        }
    }
}
