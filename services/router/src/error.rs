//! Why the router could not start, or stopped.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach Redis at {url}: {source}")]
    RedisConnect {
        url: String,
        source: redis::RedisError,
    },
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
