//! The gateway's calls to the other services over NATS: the store's operations, the router's
//! presence answers, and a cache of which user ids exist (users are never deleted, so a
//! positive answer is cached for good).

use std::time::Duration;

use chat_proto::envelope::{GetUser, PresenceAnswer, PresenceQuery, UserInfo};
use chat_proto::{StoreOp, UserId};
use chat_runtime::nats::{self, RequestError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AppState;

/// How long a request to another service may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Known user ids cached at most; the cache starts over when full.
const KNOWN_USERS_MAX: usize = 100_000;

impl AppState {
    /// One store operation.
    pub(crate) async fn store<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        op: StoreOp,
        req: &Req,
    ) -> Result<Resp, RequestError> {
        nats::request(
            &self.nats,
            "store",
            self.subjects.rpc(op),
            req,
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// Which users are online. Presence is a nicety here: when the router does not answer,
    /// everyone shows offline rather than the request failing.
    pub(crate) async fn online(&self, users: &[UserId]) -> Vec<bool> {
        if users.is_empty() {
            return Vec::new();
        }
        let query = PresenceQuery {
            user_ids: users.to_vec(),
        };
        match nats::request::<_, PresenceAnswer>(
            &self.nats,
            "router",
            self.subjects.presence_query(),
            &query,
            REQUEST_TIMEOUT,
        )
        .await
        {
            Ok(a) if a.online.len() == users.len() => a.online,
            Ok(_) => vec![false; users.len()],
            Err(e) => {
                tracing::warn!(error = %e, "presence unavailable");
                vec![false; users.len()]
            }
        }
    }

    /// Whether a user id exists.
    pub(crate) async fn user_exists(&self, id: UserId) -> Result<bool, RequestError> {
        if self
            .known_users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
        {
            return Ok(true);
        }
        let user: Option<UserInfo> = self.store(StoreOp::User, &GetUser { user_id: id }).await?;
        if user.is_some() {
            let mut known = self.known_users.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= KNOWN_USERS_MAX {
                known.clear();
            }
            known.insert(id);
        }
        Ok(user.is_some())
    }
}
