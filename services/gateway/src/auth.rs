//! Tokens: HS256 JWTs whose `sub` is the user id, and the extractor that checks them.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chat_proto::{ErrorCode, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id, as a string (JWT's `sub` is a string).
    sub: String,
    /// Expiry, seconds since the epoch.
    exp: u64,
    iat: u64,
}

/// Issues and checks tokens with one shared secret.
#[derive(Clone)]
pub(crate) struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Tokens {
    pub(crate) fn new(secret: &str, ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl,
        }
    }

    /// A token for `user`, and when it expires (ms since the epoch).
    pub(crate) fn issue(&self, user: UserId) -> (String, i64) {
        let now = chat_proto::now_ms() as u64 / 1000;
        let exp = now + self.ttl.as_secs();
        (self.sign(user, now, exp), exp as i64 * 1000)
    }

    fn sign(&self, user: UserId, now: u64, exp: u64) -> String {
        let claims = Claims {
            sub: user.to_string(),
            exp,
            iat: now,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// The user a valid, unexpired token names.
    pub(crate) fn verify(&self, token: &str) -> Option<UserId> {
        self.verify_until(token).map(|(user, _)| user)
    }

    /// The user a valid, unexpired token names, and when it expires (seconds since the
    /// epoch): a socket is closed then.
    pub(crate) fn verify_until(&self, token: &str) -> Option<(UserId, u64)> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        Some((data.claims.sub.parse().ok()?, data.claims.exp))
    }
}

/// The authenticated user of a request: `Authorization: Bearer <token>` checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuthUser(pub(crate) UserId);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        bearer(&parts.headers)
            .and_then(|t| state.tokens.verify(t))
            .map(AuthUser)
            .ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthorized, "a valid bearer token is required")
            })
    }
}

/// The token of an `Authorization: Bearer` header.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_expire() {
        let tokens = Tokens::new("k", Duration::from_secs(60));
        let (t, exp) = tokens.issue(7);
        assert_eq!(tokens.verify(&t), Some(7));
        assert!(exp > chat_proto::now_ms());
        assert_eq!(
            Tokens::new("other", Duration::from_secs(60)).verify(&t),
            None
        );
        let now = chat_proto::now_ms() as u64 / 1000;
        assert_eq!(tokens.verify(&tokens.sign(7, now - 120, now - 60)), None);
        assert_eq!(tokens.verify(&tokens.sign(7, now, now + 60)), Some(7));
        assert_eq!(tokens.verify("garbage"), None);
    }
}
