//! The gateway: the HTTP API and WebSocket edge.
//!
//! It checks tokens, publishes what users send to the in stream (answering `sent` once
//! JetStream holds it), pushes each connected user's events from NATS to their sockets, and
//! replays the backlog on connect. It holds no data of its own beyond its connections: the
//! store answers the API, the router answers presence. See `docs/architecture.md`.

mod api;
mod auth;
mod backend;
mod config;
mod error;
mod events;
mod ids;
mod limits;
mod meters;
mod send;
mod sessions;
mod settle;
pub mod socket;
mod web;
mod ws;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use chat_proto::{Subjects, UserId};
use chat_runtime::nats;
use chat_runtime::tasks::Tasks;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::trace::{DefaultMakeSpan, TraceLayer};

pub use config::{Config, DEV_JWT_SECRET};
pub use error::ApiError;
pub use ws::TOKEN_EXPIRED;

use auth::Tokens;
use ids::MsgIds;

/// How long shutdown waits for sockets to close before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] chat_runtime::nats::Error),
    #[error(transparent)]
    Events(#[from] events::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Stopped(#[from] chat_runtime::tasks::Ended),
}

/// Shared by every handler and connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub(crate) struct Inner {
    nats: async_nats::Client,
    /// Every connected user's events, on a NATS connection of their own (`events.rs`).
    events: Arc<events::UserEvents>,
    js: jetstream::Context,
    /// The in stream, to read back the first message of a retried `client_id` and to see
    /// how far the router has got.
    in_stream: jetstream::stream::Stream,
    /// The store stream, to see how far the store has got.
    store_stream: jetstream::stream::Stream,
    subjects: Subjects,
    config: Config,
    tokens: Tokens,
    /// Brute-force limits of register and login.
    auth_limits: limits::AuthLimits,
    ids: MsgIds,
    /// Identifies this process in heartbeats.
    gateway_id: String,
    /// User ids known to exist (see `backend.rs`).
    known_users: Mutex<HashSet<UserId>>,
    /// Live sessions on this gateway: session id → user. A std mutex: held for map
    /// operations only, never across an await.
    sessions: Mutex<HashMap<String, UserId>>,
    /// Fires on shutdown: every connection closes with 1001.
    cancel: CancellationToken,
    /// One token per open socket, so shutdown can wait for them.
    connections: TaskTracker,
    /// The connect-time pipeline checks, shared by the connects of a moment.
    settler: Arc<settle::Settler>,
}

/// A gateway with its listener bound, not yet serving.
pub struct App {
    state: AppState,
    listener: tokio::net::TcpListener,
    events: events::Link,
}

impl App {
    pub async fn build(config: Config) -> Result<App, Error> {
        if config.jwt_secret == DEV_JWT_SECRET {
            tracing::warn!(
                "CHAT_JWT_SECRET is not set: tokens are signed with a development key anyone can read. Set it in production."
            );
        }
        let subjects = config.common.namespace.clone();
        let client = nats::connect(&config.common.nats_url, "chat-gateway").await?;
        let (events, link) =
            events::UserEvents::connect(&config.common.nats_url, "chat-gateway events").await?;
        let js = jetstream::new(client.clone());
        let (in_stream, store_stream) = nats::ensure_streams(&js, &subjects).await?;
        let listener = listen(&config.http_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.http_addr.clone(),
                source,
            })?;
        let tokens = Tokens::new(&config.jwt_secret, config.token_ttl);
        let state = AppState(Arc::new(Inner {
            nats: client,
            events,
            js,
            in_stream,
            store_stream,
            subjects,
            tokens,
            auth_limits: limits::AuthLimits::new(config.auth_rate_ip, config.login_rate_user),
            ids: MsgIds::default(),
            gateway_id: uuid::Uuid::new_v4().to_string(),
            known_users: Mutex::new(HashSet::new()),
            sessions: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            connections: TaskTracker::new(),
            settler: Arc::default(),
            config,
        }));
        Ok(App {
            state,
            listener,
            events: link,
        })
    }

    /// Where the server listens (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves until `shutdown` resolves; then stops accepting, closes every socket with 1001
    /// (removing its session), and returns once they are closed or the grace period is over.
    /// The same, and an error, if the HTTP server, the heartbeat or the users' event
    /// connection ended first (see [`chat_runtime::tasks`]).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let state = self.state;
        let routes = Router::new()
            .route("/api/v1/register", post(api::register))
            .route("/api/v1/login", post(api::login))
            .route("/api/v1/me", get(api::me))
            .route("/api/v1/users", get(api::users))
            .route("/api/v1/conversations", get(api::conversations))
            .route(
                "/api/v1/conversations/{peer_id}/messages",
                get(api::history),
            )
            .route("/ws", get(ws::upgrade))
            .merge(chat_runtime::ops::routes(api::readiness(&state)))
            .merge(web::routes())
            // An info-level span per request: login, history and the rest are traces of their
            // own, with the store's work beneath (tower-http's default level is debug).
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(DefaultMakeSpan::new().level(tracing::Level::INFO)),
            )
            .with_state(state.clone());
        let every = (state.config.presence_ttl / 3).max(Duration::from_millis(100));
        let mut tasks = Tasks::new(state.cancel.clone());
        tasks.spawn(
            "heartbeat",
            sessions::heartbeat(state.clone(), every, state.cancel.clone()),
        );
        tasks.spawn("events", self.events.run(state.cancel.clone()));
        let service = routes.into_make_service_with_connect_info::<SocketAddr>();
        tracing::info!(addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "chat-gateway serving");
        // Frames are small and latency matters: no waiting for Nagle's algorithm.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let stopping = state.cancel.clone().cancelled_owned();
        tasks.spawn("http", async move {
            if let Err(e) = axum::serve(listener, service)
                .with_graceful_shutdown(stopping)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        // Upgraded sockets are not the HTTP server's: they close below, each with 1001.
        let result = tasks.run_until(shutdown).await;
        state.connections.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, state.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("sockets still open after the grace period");
        }
        nats::flush_at_exit(&state.nats).await;
        Ok(result?)
    }
}

/// Pending connections the kernel queues for us: a connect storm of thousands must not
/// overflow it (tokio's `bind` uses 1024).
const LISTEN_BACKLOG: u32 = 8192;

async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Builds and runs a gateway until `shutdown`, printing where it listens.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    App::build(config).await?.run_until(shutdown).await
}
