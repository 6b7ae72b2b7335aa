//! Waiting, at connect, for the pipeline to settle.
//!
//! A message is `sent` once the in stream holds it, but it joins the backlog only once the
//! router has handed it to the store and the store has committed it. PROTOCOL.md promises
//! that what was sent while the user was offline arrives before `backlog_done`, so before
//! querying the backlog a connection waits until the router's consumer of the in stream, then
//! the store's consumer of the store stream, has acked everything its stream held when it
//! asked (the consumer's ack floor reaches the stream's last sequence seen).
//! The wait is bounded: past it (a store down, a message being retried) the connection goes
//! on, and whatever is still in flight arrives live after `backlog_done`, never lost.

use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use tokio::time::Instant;

use crate::AppState;

/// The longest a connection waits for the pipeline before replaying anyway.
const SETTLE_LIMIT: Duration = Duration::from_secs(2);

impl AppState {
    pub(crate) async fn settle(&self) {
        let deadline = Instant::now() + SETTLE_LIMIT;
        let (router, store) = (
            self.subjects.router_consumer(),
            self.subjects.store_consumer(),
        );
        if drained(&self.in_stream, router, deadline).await {
            drained(&self.store_stream, store, deadline).await;
        }
    }
}

/// Whether `consumer` acked everything `stream` held on entry before `deadline`.
async fn drained(stream: &Stream, consumer: &str, deadline: Instant) -> bool {
    let Ok(info) = stream.get_info().await else {
        return false;
    };
    let target = info.state.last_sequence;
    let mut pause = Duration::from_millis(1);
    loop {
        match stream.consumer_info(consumer).await {
            Ok(c) if c.ack_floor.stream_sequence >= target => return true,
            // No consumer yet (its service has not started): nothing will drain meanwhile.
            Ok(_) | Err(_) => {}
        }
        if Instant::now() + pause > deadline {
            tracing::info!(stream = %info.config.name, "pipeline busy; replaying the backlog without waiting");
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
