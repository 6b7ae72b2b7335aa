//! The router: presence in Redis and, per message, the live-or-offline decision.
//!
//! It consumes the in stream (messages gateways accepted) and pushes live ones straight to the
//! recipient's devices (see [`routing`]); the store gets every message from NATS itself, as
//! its stream sources the in stream. It records sessions that gateways announce and
//! heartbeat, sweeps expired ones, and tells users' peers when they come online or go offline
//! (see [`sessions`]). It never touches MySQL or sockets.

mod config;
mod error;
mod presence;
mod routing;
mod sessions;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chat_proto::Subjects;
use chat_runtime::tasks::Tasks;
use chat_runtime::{nats, ops};
use redis::IntoConnectionInfo;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

use presence::Presence;

/// In-stream messages routed per batch at most.
const BATCH: usize = 256;
/// Presence messages handled at once per subscription.
const CONCURRENCY: usize = 64;

#[derive(Clone)]
pub(crate) struct State {
    nats: async_nats::Client,
    js: jetstream::Context,
    presence: Presence,
    subjects: Arc<Subjects>,
}

/// A router connected to its backends, not yet serving.
pub struct App {
    state: State,
    consumer: jetstream::consumer::PullConsumer,
    /// The stream the consumer reads, to report its lag.
    stream: jetstream::stream::Stream,
    subs: [async_nats::Subscriber; 4],
    sweep_every: Duration,
    ops: tokio::net::TcpListener,
}

impl App {
    pub async fn build(config: Config) -> Result<App, Error> {
        let subjects = Arc::new(config.common.namespace.clone());
        let ops = tokio::net::TcpListener::bind(&config.ops_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.ops_addr.clone(),
                source,
            })?;
        let client = nats::connect(&config.common.nats_url, "chat-router").await?;
        let redis_err = |source| Error::RedisConnect {
            url: config.redis_url.clone(),
            source,
        };
        // RESP3, for the invalidation pushes that keep the cache of session counts true.
        let info = config
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(redis_err)?;
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let redis = redis::Client::open(info.set_redis_settings(resp3)).map_err(redis_err)?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_cache_config(presence::cache_config());
        let redis = redis
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(redis_err)?;
        let js = jetstream::new(client.clone());
        let (in_stream, _) = nats::ensure_streams(&js, &subjects).await?;
        let consumer =
            nats::durable_consumer(&in_stream, subjects.router_consumer(), config.ack_wait).await?;
        let group = subjects.queue_group("router");
        let subs = [
            client
                .queue_subscribe(subjects.presence_up(), group.clone())
                .await?,
            client
                .queue_subscribe(subjects.presence_down(), group.clone())
                .await?,
            client
                .queue_subscribe(subjects.presence_heartbeat(), group.clone())
                .await?,
            client
                .queue_subscribe(subjects.presence_query(), group)
                .await?,
        ];
        let presence = Presence::new(redis, subjects.redis_prefix(), config.presence_ttl);
        Ok(App {
            state: State {
                nats: client,
                js,
                presence,
                subjects,
            },
            consumer,
            stream: in_stream,
            subs,
            sweep_every: (config.presence_ttl / 10)
                .clamp(Duration::from_millis(100), Duration::from_secs(1)),
            ops,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        ops::local_addr(&self.ops)
    }

    /// Ready while NATS is connected and Redis answers.
    fn readiness(&self) -> ops::Readiness {
        ops::readiness(self.state.clone(), |state| async move {
            vec![
                ops::nats_check(&state.nats),
                ops::probe("redis", state.presence.ping()).await,
            ]
        })
    }

    /// Serves until `shutdown` resolves, then stops pulling, finishes the work in hand and
    /// returns; an error if one of its tasks ended first (see [`chat_runtime::tasks`]).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        let ready = self.readiness();
        let consumer = self.state.subjects.router_consumer();
        ops::spawn_for_consumer(&mut tasks, self.ops, ready, self.stream, consumer, &cancel);
        let [up, down, beat, query] = self.subs;
        let s = self.state.clone();
        tasks.spawn(
            "presence up",
            nats::serve(up, CONCURRENCY, cancel.clone(), move |m| {
                sessions::up(s.clone(), m)
            }),
        );
        let s = self.state.clone();
        tasks.spawn(
            "presence down",
            nats::serve(down, CONCURRENCY, cancel.clone(), move |m| {
                sessions::down(s.clone(), m)
            }),
        );
        let s = self.state.clone();
        tasks.spawn(
            "heartbeats",
            nats::serve(beat, CONCURRENCY, cancel.clone(), move |m| {
                sessions::heartbeat(s.clone(), m)
            }),
        );
        let s = self.state.clone();
        tasks.spawn(
            "presence queries",
            nats::serve(query, CONCURRENCY, cancel.clone(), move |m| {
                sessions::query(s.clone(), m)
            }),
        );
        tasks.spawn(
            "sweep",
            sessions::sweep(self.state.clone(), self.sweep_every, cancel.clone()),
        );
        let s = self.state.clone();
        tasks.spawn(
            "route",
            nats::consume(
                self.consumer,
                BATCH,
                // The live push waits on this batch: hand it on at once.
                Duration::ZERO,
                cancel.clone(),
                move |batch| {
                    let s = s.clone();
                    async move { routing::route_batch(&s, batch).await }
                },
            ),
        );
        tracing::info!("chat-router serving");
        let result = tasks.run_until(shutdown).await;
        nats::flush_at_exit(&self.state.nats).await;
        Ok(result?)
    }
}

/// Builds and runs a router until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    App::build(config).await?.run_until(shutdown).await
}
