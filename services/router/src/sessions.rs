//! Sessions opening, closing, heartbeating and expiring, and the presence events they cause.
//!
//! A user's presence changes only on a transition (first session up, last session gone);
//! then the router tells everyone who shares a conversation with them (asking the store who
//! that is) and, on going offline, has the store record `last_seen`.

use std::time::Duration;

use chat_proto::envelope::{
    Heartbeat, Peers, PresenceAnswer, PresenceQuery, Reply, SessionDown, SessionUp, StoreSeen,
};
use chat_proto::frame::ServerFrame;
use chat_proto::{ErrorCode, StoreOp, StoreWork, UserId};
use chat_runtime::{nats, telemetry};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::State;

/// Expired sessions claimed per sweep.
const SWEEP_MAX: usize = 1000;

fn decode<T: serde::de::DeserializeOwned>(msg: &async_nats::Message) -> Option<T> {
    match serde_json::from_slice(&msg.payload) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "undecodable presence message");
            None
        }
    }
}

/// A session opened: record it, answer (the gateway waits, so the fast path knows the user
/// from the first message on), and announce the user if they just came online.
pub(crate) async fn up(state: State, msg: async_nats::Message) {
    let span = tracing::info_span!("router.session_up");
    telemetry::extract(msg.headers.as_ref(), &span);
    async {
        let Some(req) = decode::<SessionUp>(&msg) else {
            return;
        };
        let reply = match state
            .presence
            .touch(std::slice::from_ref(&req.session))
            .await
        {
            Ok(came) => {
                nats::respond(&state.nats, msg.reply.as_deref(), &Reply::Ok(())).await;
                came
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a session");
                let err: Reply<()> = Reply::err(ErrorCode::Internal, "presence unavailable");
                nats::respond(&state.nats, msg.reply.as_deref(), &err).await;
                Vec::new()
            }
        };
        for user in reply {
            announce(&state, user, true).await;
        }
    }
    .instrument(span)
    .await;
}

pub(crate) async fn down(state: State, msg: async_nats::Message) {
    let span = tracing::info_span!("router.session_down");
    telemetry::extract(msg.headers.as_ref(), &span);
    async {
        let Some(req) = decode::<SessionDown>(&msg) else {
            return;
        };
        match state.presence.drop_session(&req.session).await {
            Ok(true) => announce(&state, req.session.user_id, false).await,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot drop a session; it will expire"),
        }
    }
    .instrument(span)
    .await;
}

pub(crate) async fn heartbeat(state: State, msg: async_nats::Message) {
    let Some(beat) = decode::<Heartbeat>(&msg) else {
        return;
    };
    match state.presence.touch(&beat.sessions).await {
        Ok(came) => {
            for user in came {
                announce(&state, user, true).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, gateway = %beat.gateway_id, "cannot refresh sessions"),
    }
}

pub(crate) async fn query(state: State, msg: async_nats::Message) {
    let Some(req) = decode::<PresenceQuery>(&msg) else {
        return;
    };
    let reply = match state.presence.sessions(&req.user_ids).await {
        Ok(counts) => Reply::Ok(PresenceAnswer {
            online: counts.into_iter().map(|c| c > 0).collect(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read presence");
            Reply::err(ErrorCode::Internal, "presence unavailable")
        }
    };
    nats::respond(&state.nats, msg.reply.as_deref(), &reply).await;
}

/// Announces users whose last session expired, until `cancel` fires.
pub(crate) async fn sweep(state: State, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match state.presence.sweep(SWEEP_MAX).await {
            Ok(gone) => {
                for user in gone {
                    announce(&state, user, false).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
        }
        if let Ok((users, sessions)) = state.presence.counts().await {
            metrics::gauge!("chat_online_users").set(users as f64);
            metrics::gauge!("chat_online_sessions").set(sessions as f64);
        }
    }
}

/// Tells everyone who shares a conversation with `user` that they came online or went
/// offline; on going offline, has the store record the time.
async fn announce(state: &State, user: UserId, online: bool) {
    let now = chat_proto::now_ms();
    if !online {
        let seen = StoreSeen {
            user_id: user,
            last_seen: now,
        };
        let stored = match serde_json::to_vec(&seen) {
            Ok(payload) => match state
                .js
                .publish_with_headers(
                    state.subjects.store(StoreWork::Seen),
                    telemetry::headers(),
                    payload.into(),
                )
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = stored {
            tracing::warn!(error = %e, user, "cannot record last seen");
        }
    }
    let peers: Vec<UserId> = match nats::request(
        &state.nats,
        "store",
        state.subjects.rpc(StoreOp::Peers),
        &Peers { user_id: user },
        Duration::from_secs(5),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, user, "cannot find who to tell of a presence change");
            return;
        }
    };
    let frame = ServerFrame::Presence {
        user_id: user,
        online,
        last_seen: Some(now),
    };
    for peer in peers {
        nats::publish_json(&state.nats, state.subjects.user(peer), &frame).await;
    }
}
