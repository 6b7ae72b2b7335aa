//! Why the store could not start, could not do a piece of work, or stopped.

use chat_proto::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DATABASE_URL {0:?} is not a mysql:// URL naming a database of [A-Za-z0-9_]")]
    DatabaseUrl(String),
    #[error("cannot reach MySQL at {url}: {source}")]
    DbConnect { url: String, source: sea_orm::DbErr },
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Nats(#[from] chat_runtime::nats::Error),
    #[error("NATS subscription: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Stopped(#[from] chat_runtime::tasks::Ended),
}

impl Error {
    /// What a caller is told: internals stay in the log, which this writes once.
    pub(crate) fn to_reply(&self) -> ErrorBody {
        tracing::error!(error = %self, "store operation failed");
        ErrorBody::new(ErrorCode::Internal, "internal error")
    }
}
