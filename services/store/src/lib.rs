//! The store: the one owner of MySQL (through SeaORM).
//!
//! It consumes the store stream (the in stream's messages, which NATS copies into it, and
//! `<ns>.store.>`: delivery and read marks, last seen), writes each batch in one transaction, acks only after the commit, and then
//! publishes the "stored" notice that is every message's sure path to its recipient. It also
//! answers request/reply operations: accounts, search, conversations, history and the backlog
//! a gateway replays when a user connects.

mod config;
mod consumer;
mod db;
mod entity;
mod error;
mod messages;
mod password;
mod rpc;
mod users;

use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream;
use chat_proto::Subjects;
use chat_runtime::tasks::Tasks;
use chat_runtime::{nats, ops};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

pub use config::{Config, DEFAULT_BATCH_LINGER};
pub use error::Error;

/// Store stream messages handled per batch (and per transaction) at most.
const BATCH: usize = 256;

/// Cheap-to-clone handles every handler needs.
#[derive(Clone)]
pub(crate) struct State {
    db: DatabaseConnection,
    nats: async_nats::Client,
    subjects: Arc<Subjects>,
}

/// A store connected to its backends, not yet serving.
pub struct App {
    state: State,
    rpc: async_nats::Subscriber,
    consumer: jetstream::consumer::PullConsumer,
    /// The stream the consumer reads, to report its lag.
    stream: jetstream::stream::Stream,
    ops: tokio::net::TcpListener,
    /// How long a batch that is not full waits for more ([`Config::batch_linger`]).
    linger: std::time::Duration,
}

impl App {
    /// Connects to NATS and MySQL (creating and migrating the database), makes sure the
    /// streams and the durable consumer exist, and subscribes to requests.
    pub async fn build(config: Config) -> Result<App, Error> {
        let subjects = Arc::new(config.common.namespace.clone());
        let ops = tokio::net::TcpListener::bind(&config.ops_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.ops_addr.clone(),
                source,
            })?;
        let client = nats::connect(&config.common.nats_url, "chat-store").await?;
        let db = db::connect(&config.database_url).await?;
        db::migrate(&db).await?;
        let js = jetstream::new(client.clone());
        let (_, store_stream) = nats::ensure_streams(&js, &subjects).await?;
        nats::upgrade_store_stream(&js, &subjects, &store_stream).await?;
        let consumer =
            nats::durable_consumer(&store_stream, subjects.store_consumer(), config.ack_wait)
                .await?;
        let rpc = client
            .queue_subscribe(subjects.rpc_all(), subjects.queue_group("store"))
            .await?;
        Ok(App {
            state: State {
                db,
                nats: client,
                subjects,
            },
            rpc,
            consumer,
            stream: store_stream,
            ops,
            linger: config.batch_linger,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` answer.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        ops::local_addr(&self.ops)
    }

    /// Ready while NATS is connected and MySQL answers.
    fn readiness(&self) -> ops::Readiness {
        ops::readiness(self.state.clone(), |state| async move {
            vec![
                ops::nats_check(&state.nats),
                ops::probe("mysql", state.db.ping()).await,
            ]
        })
    }

    /// Serves until `shutdown` resolves, then stops pulling, finishes the work in hand and
    /// returns; an error if one of its tasks ended first (see [`chat_runtime::tasks`]).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        let ready = self.readiness();
        let consumer = self.state.subjects.store_consumer();
        ops::spawn_for_consumer(&mut tasks, self.ops, ready, self.stream, consumer, &cancel);
        tasks.spawn(
            "requests",
            rpc::serve(self.state.clone(), self.rpc, cancel.clone()),
        );
        let state = self.state.clone();
        tasks.spawn(
            "write",
            nats::consume(
                self.consumer,
                BATCH,
                self.linger,
                cancel.clone(),
                move |batch| {
                    let state = state.clone();
                    async move { consumer::handle_batch(&state, batch).await }
                },
            ),
        );
        tracing::info!("chat-store serving");
        let result = tasks.run_until(shutdown).await;
        nats::flush_at_exit(&self.state.nats).await;
        let _ = self.state.db.close().await;
        Ok(result?)
    }
}

/// Builds and runs a store until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    App::build(config).await?.run_until(shutdown).await
}

/// Connects to the database and applies pending migrations (`chat-store --migrate-only`).
pub async fn migrate_only(config: &Config) -> Result<(), Error> {
    let db = db::connect(&config.database_url).await?;
    db::migrate(&db).await?;
    db.close().await?;
    Ok(())
}
