//! Waiting, at connect, for the pipeline to settle.
//!
//! A message is `sent` once the in stream holds it, but it joins the backlog only once NATS
//! has copied it into the store stream (which sources the in stream) and the store has
//! committed it. PROTOCOL.md promises that what was sent while the user was offline arrives
//! before `backlog_done`, so before querying the backlog a connection waits until the
//! router's consumer of the in stream has acked everything the stream held when it asked,
//! then until the store stream has caught up with its source and the store's consumer has
//! acked everything the store stream held by then (a consumer's ack floor reaches its
//! stream's last sequence seen). The store stream reports how far behind its source it is as
//! of its last copy, so the router goes first: once the router has acked the in stream's last
//! message, that message is no longer new, and "nothing behind" includes it.
//! The wait is bounded: past it (a store down, a message being retried) the connection goes
//! on, and whatever is still in flight arrives live after `backlog_done`, never lost.
//!
//! Connections that ask at about the same time share one check (a round): a connect storm
//! would otherwise make at least four JetStream API requests per socket, which nats-server
//! answers one after another. Rounds run one at a time, in a task of their own; a connection
//! waits for the round that starts after it asked (it reads the streams then, so it sees
//! everything the connection could), and connections gather for the next while one runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use tokio::time::Instant;

use crate::AppState;

/// The longest a connection waits for the pipeline before replaying anyway.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// The rounds of one gateway.
pub(crate) struct Settler {
    rounds: Mutex<Rounds>,
    /// How many rounds have ended.
    ended: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Rounds {
    /// How many rounds have started (read the streams).
    started: u64,
    /// The last round a connection waits for.
    wanted: u64,
    /// Whether a task runs rounds.
    running: bool,
}

impl Default for Settler {
    fn default() -> Self {
        Settler {
            rounds: Mutex::new(Rounds::default()),
            ended: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl AppState {
    pub(crate) async fn settle(&self) {
        let settler = &self.settler;
        // The round that starts next: it starts after this point, so after this connection
        // asked.
        let round = {
            let mut rounds = settler.rounds.lock().unwrap_or_else(|e| e.into_inner());
            let round = rounds.started + 1;
            rounds.wanted = round;
            if !rounds.running {
                rounds.running = true;
                let (settler, in_stream, store_stream) = (
                    Arc::clone(settler),
                    self.in_stream.clone(),
                    self.store_stream.clone(),
                );
                let (router, store) = (
                    self.subjects.router_consumer(),
                    self.subjects.store_consumer(),
                );
                tokio::spawn(async move {
                    settler.run(&in_stream, router, &store_stream, store).await;
                });
            }
            round
        };
        let mut ended = settler.ended.subscribe();
        let waited = tokio::time::timeout(SETTLE_LIMIT, ended.wait_for(|&n| n >= round)).await;
        if waited.is_err() {
            tracing::info!("pipeline busy; replaying the backlog without waiting");
        }
    }
}

impl Settler {
    /// Runs rounds, one at a time, while connections wait for one not yet started.
    async fn run(&self, in_stream: &Stream, router: &str, store_stream: &Stream, store: &str) {
        loop {
            let round = {
                let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
                if rounds.started >= rounds.wanted {
                    rounds.running = false;
                    return;
                }
                rounds.started += 1;
                rounds.started
            };
            let deadline = Instant::now() + SETTLE_LIMIT;
            if drained(in_stream, router, deadline).await {
                drained(store_stream, store, deadline).await;
            }
            self.ended.send_replace(round);
        }
    }
}

/// Whether `consumer` acked, before `deadline`, everything `stream` held on entry, or, for a
/// stream that sources others, once it had copied all they held.
async fn drained(stream: &Stream, consumer: &str, deadline: Instant) -> bool {
    let mut pause = Duration::from_millis(1);
    let mut target = None;
    loop {
        match target {
            None => match stream.get_info().await {
                Ok(info) if info.sources.iter().all(|s| s.lag == 0) => {
                    target = Some(info.state.last_sequence);
                    continue;
                }
                Ok(_) | Err(_) => {}
            },
            Some(target) => match stream.consumer_info(consumer).await {
                Ok(c) if c.ack_floor.stream_sequence >= target => return true,
                // No consumer yet (its service has not started): nothing will drain meanwhile.
                Ok(_) | Err(_) => {}
            },
        }
        if Instant::now() + pause > deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
