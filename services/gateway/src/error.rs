//! Errors of the HTTP API: each becomes PROTOCOL.md's `{"error": {"code", "message"}}` with
//! its status. Internal failures are logged once here and reach the client only as `internal`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chat_proto::{ErrorBody, ErrorCode};
use chat_runtime::nats::RequestError;

#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(ErrorBody::new(code, message))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    fn status(&self) -> StatusCode {
        match self.0.code {
            ErrorCode::BadRequest
            | ErrorCode::InvalidUsername
            | ErrorCode::InvalidPassword
            | ErrorCode::UnknownType
            | ErrorCode::BodyTooLong
            | ErrorCode::EmptyBody
            | ErrorCode::UnknownRecipient => StatusCode::BAD_REQUEST,
            ErrorCode::UsernameTaken => StatusCode::CONFLICT,
            ErrorCode::BadCredentials | ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::UnknownUser => StatusCode::NOT_FOUND,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Remote(body) => ApiError(body),
            RequestError::NoResponders(_) | RequestError::Timeout(_) => {
                tracing::warn!(error = %e, "backend unavailable");
                ApiError::new(
                    ErrorCode::NotReady,
                    "the service is not available; retry shortly",
                )
            }
            RequestError::Other { .. } => {
                tracing::error!(error = %e, "request failed");
                ApiError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        (status, Json(serde_json::json!({ "error": self.0 }))).into_response()
    }
}
