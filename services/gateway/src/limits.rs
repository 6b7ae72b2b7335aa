//! Brute-force limits on the account endpoints: per client address for register and login,
//! and per username for login, so guessing one account's password from many addresses is
//! slow too. Over a limit the answer is `429 rate_limited`.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;

use chat_proto::ErrorCode;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Keys tracked before idle ones are forgotten.
const TRACKED_KEYS: usize = 100_000;

pub(crate) struct AuthLimits {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    per_username: DefaultKeyedRateLimiter<String>,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("max(1) is non-zero"))
}

fn check<K: Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), ApiError> {
    if limiter.len() > TRACKED_KEYS {
        limiter.retain_recent();
    }
    limiter.check_key(key).map_err(|_| {
        ApiError::new(
            ErrorCode::RateLimited,
            "too many attempts; wait a minute and retry",
        )
    })
}

impl AuthLimits {
    pub(crate) fn new(per_ip_per_minute: u32, login_per_username_per_minute: u32) -> Self {
        AuthLimits {
            per_ip: RateLimiter::keyed(per_minute(per_ip_per_minute)),
            per_username: RateLimiter::keyed(per_minute(login_per_username_per_minute)),
        }
    }

    /// A register or login from `ip`.
    pub(crate) fn address(&self, ip: IpAddr) -> Result<(), ApiError> {
        check(&self.per_ip, &ip)
    }

    /// A login attempt for `username` (case-insensitively, as usernames are unique).
    pub(crate) fn login(&self, username: &str) -> Result<(), ApiError> {
        check(&self.per_username, &username.to_ascii_lowercase())
    }
}
