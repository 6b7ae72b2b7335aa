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
            tracing::info!(%consumer, "pipeline busy; replaying the backlog without waiting");
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
