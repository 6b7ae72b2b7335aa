//! NATS as every service uses it: connecting with a clear error, the two JetStream streams,
//! durable pull consumers and the loop that feeds them to a handler in batches, and JSON
//! request/reply carrying the trace context.

use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use chat_proto::envelope::Reply;
use chat_proto::{ErrorBody, Subjects};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// How long JetStream remembers a `Nats-Msg-Id`: a `send` retried within this window gets the
/// first message's id back without a store round trip; the store's unique key on
/// (sender, client_id) keeps later retries from making a second row.
///
/// The in stream keeps its messages for as long (limits retention with this `max_age`, not a
/// work queue): JetStream rebuilds its de-dup memory after a restart from the messages the
/// stream still holds, so a retry across a NATS restart is still recognised.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);

/// The store stream's de-dup window: one second (0 would mean JetStream's default of two
/// minutes), because the stream has nothing to de-duplicate. What it holds is either the in
/// stream's copy (each message already de-duplicated there, and written once by the store
/// however often it comes) or a delivery or read mark (published without an id; applying one
/// twice changes nothing). JetStream still remembers the `Nats-Msg-Id` every copy carries for
/// the window: at [`DEDUP_WINDOW`] that was a second map as large as the in stream's, ~200
/// bytes of nats-server memory per message of the last 10 minutes (docs/benchmarks.md).
pub const STORE_DEDUP_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {name}: {message}")]
    Stream { name: String, message: String },
    #[error("JetStream consumer {name}: {message}")]
    Consumer { name: String, message: String },
}

/// Connects, failing at once (not retrying) when the server does not answer, so a service
/// started against a wrong URL says so in one line. After the first connection the client
/// reconnects by itself for ever.
pub async fn connect(url: &str, name: &str) -> Result<Client, Error> {
    connect_with(options(name), url).await
}

async fn connect_with(options: async_nats::ConnectOptions, url: &str) -> Result<Client, Error> {
    options.connect(url).await.map_err(|source| Error::Connect {
        url: redacted_url(url),
        source,
    })
}

/// `url` (one NATS server or several, comma-separated) with every password or token
/// replaced by `***`, for messages and logs.
pub fn redacted_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), one),
            };
            match rest.rsplit_once('@') {
                Some((credentials, host)) => {
                    let shown = match credentials.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => "***".to_owned(),
                    };
                    format!("{scheme}{shown}@{host}")
                }
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn options(name: &str) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move { tracing::info!(%event, "NATS connection") })
}

/// How long a client waits before its next attempt to reach NATS again, after `attempts`
/// failed ones in a row: at once, then every [`RECONNECT_WAIT`]. (async-nats doubles the wait
/// up to 4 s, so a client could find NATS back only seconds after it was; every message
/// crosses NATS, and the messages of those seconds waited for it: docs/benchmarks.md.)
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        Duration::ZERO
    } else {
        RECONNECT_WAIT
    }
}

/// The wait between attempts to reach NATS again: a few connections a second per service
/// process while NATS is away, and NATS found at most this long after it is back.
pub const RECONNECT_WAIT: Duration = Duration::from_millis(250);

/// How long a stopping service waits for NATS to take what it still has to send: normally a
/// round trip. async-nats holds a flush until it is connected again, however long NATS is
/// away, so without a bound a service told to stop during an outage would never exit.
const EXIT_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// Sends what `client` still buffers, the last thing a service does before it exits. When
/// NATS does not take it within [`EXIT_FLUSH_LIMIT`] the service exits anyway: what it had
/// not acked is redelivered to another replica (or to itself when it is back), and handlers
/// are idempotent; a lost presence announcement is restated by the next heartbeat or sweep.
pub async fn flush_at_exit(client: &Client) {
    match tokio::time::timeout(EXIT_FLUSH_LIMIT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush to NATS before exiting"),
        Err(_) => tracing::warn!(
            limit = ?EXIT_FLUSH_LIMIT,
            "NATS is not answering; exiting without waiting for it (unacked work is redelivered)"
        ),
    }
}

/// Creates the in and store streams if missing (file storage, message de-duplication) and
/// checks that an existing one has the settings the design relies on. The in stream keeps
/// messages for [`DEDUP_WINDOW`] (see there); the store stream is a work queue that sources
/// the in stream: NATS itself copies every accepted message into it, under the in stream's
/// subject, so the store has it until the store acks it, however long that takes. Every
/// service calls it at start, so the order services start in does not matter.
pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<(stream::Stream, stream::Stream), Error> {
    let inbound = stream::Config {
        name: subjects.in_stream(),
        subjects: vec![subjects.inbound()],
        retention: stream::RetentionPolicy::Limits,
        max_age: DEDUP_WINDOW,
        ..stream_defaults()
    };
    Ok((
        ensure_stream(js, inbound, Dedup::Checked).await?,
        // An older version made it with the in stream's window; the store updates it
        // (`upgrade_store_stream`), and until then it works as it is.
        ensure_stream(js, store_config(subjects), Dedup::Unchecked).await?,
    ))
}

fn store_config(subjects: &Subjects) -> stream::Config {
    stream::Config {
        name: subjects.store_stream(),
        subjects: vec![subjects.store_all()],
        retention: stream::RetentionPolicy::WorkQueue,
        sources: Some(vec![stream::Source {
            name: subjects.in_stream(),
            ..Default::default()
        }]),
        duplicate_window: STORE_DEDUP_WINDOW,
        ..stream_defaults()
    }
}

/// Brings a store stream an older version made up to date: the in stream as its source (the
/// routers once copied messages into it themselves) and [`STORE_DEDUP_WINDOW`]. Only the store
/// calls it, at start: an older store would dead-letter the copies (it does not know their
/// subject), so an upgrade stops every older store before a new one starts
/// (docs/operations.md). The copying starts at the in stream's oldest message, which the
/// store may have written already; it writes each message once however often it comes.
///
/// `store` is the stream as [`ensure_streams`] returned it: its settings as read there.
pub async fn upgrade_store_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    store: &stream::Stream,
) -> Result<(), Error> {
    let name = subjects.store_stream();
    let info = store.cached_info();
    let sources: Vec<&str> = info
        .config
        .sources
        .iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
    let window = info.config.duplicate_window;
    if sources == [subjects.in_stream().as_str()] && window == STORE_DEDUP_WINDOW {
        return Ok(());
    }
    tracing::warn!(stream = %name, ?sources, ?window, "the store stream an older version made: sourcing the in stream, de-dup window {STORE_DEDUP_WINDOW:?}");
    js.update_stream(store_config(subjects))
        .await
        .map_err(|e| Error::Stream {
            name,
            message: format!("cannot bring it up to date: {e}"),
        })?;
    Ok(())
}

fn stream_defaults() -> stream::Config {
    stream::Config {
        storage: stream::StorageType::File,
        duplicate_window: DEDUP_WINDOW,
        ..Default::default()
    }
}

/// Whether an existing stream's de-dup window must be the wanted one.
#[derive(Clone, Copy, PartialEq)]
enum Dedup {
    Checked,
    Unchecked,
}

async fn ensure_stream(
    js: &jetstream::Context,
    wanted: stream::Config,
    dedup: Dedup,
) -> Result<stream::Stream, Error> {
    let name = wanted.name.clone();
    let fail = |message: String| Error::Stream {
        name: name.clone(),
        message,
    };
    let mut stream = match js.get_or_create_stream(wanted.clone()).await {
        Ok(stream) => stream,
        // Another service made it between this one's look and its create (services start
        // together). NATS 2.9 answers the create of a stream with sources that exists already
        // "in use with a different configuration" even when the request is the same, so the
        // stream is taken as it is and checked below like any other.
        Err(created) => js
            .get_stream(&name)
            .await
            .map_err(|_| fail(created.to_string()))?,
    };
    let info = stream.info().await.map_err(|e| fail(e.to_string()))?;
    let got = &info.config;
    if got.subjects != wanted.subjects
        || got.storage != wanted.storage
        || got.retention != wanted.retention
        || got.max_age != wanted.max_age
        || (dedup == Dedup::Checked && got.duplicate_window != wanted.duplicate_window)
    {
        return Err(fail(format!(
            "exists with subjects {:?}, {:?} storage, {:?} retention, max age {:?}, de-dup window {:?}; \
             expected {:?}, {:?}, {:?}, {:?}, {:?} (an older version made it: delete the stream with \
             `nats stream rm {name}` once it is empty)",
            got.subjects,
            got.storage,
            got.retention,
            got.max_age,
            got.duplicate_window,
            wanted.subjects,
            wanted.storage,
            wanted.retention,
            wanted.max_age,
            wanted.duplicate_window,
        )));
    }
    Ok(stream)
}

/// Creates (or binds to) a durable pull consumer: every replica of a service binds the same
/// one, so replicas share the work.
pub async fn durable_consumer(
    stream: &stream::Stream,
    durable: &str,
    ack_wait: Duration,
) -> Result<consumer::PullConsumer, Error> {
    let config = consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: 20_000,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(durable, config)
        .await
        .map_err(|e| Error::Consumer {
            name: durable.to_owned(),
            message: e.to_string(),
        })
}

/// How long one pull request stays open at the server. A new one is made while the newest
/// is still open (see [`Pulls`]), so one lost to a NATS restart is replaced within about
/// this long, and a stopping service drains for at most this plus [`PULL_MARGIN`]: short,
/// because a stop waits for it. The price: two requests a second per consumer while idle,
/// 0.1–0.2 % of a core of nats-server's here (docs/benchmarks.md, the changes table).
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long after a pull's expiry its messages may still be on their way. A pull is given up
/// this long after its expiry whether or not the server said it ended (NATS 2.9.10 often
/// does not: docs/benchmarks.md ⁴).
const PULL_MARGIN: Duration = Duration::from_secs(1);
/// Messages one pull request asks for; they are handed on in chunks as they arrive.
const PULL_MAX: usize = 2000;

/// Feeds `handle` with batches of whatever messages are ready (up to `batch`) until `cancel`
/// fires. The handler acks, naks or terminates each message itself.
///
/// With a `linger`, a batch that is not full waits up to that long after its first message
/// for more to join it: fewer, larger batches (one transaction each in the store) for that
/// much more delay. Zero hands on at once what has arrived.
///
/// Pull requests are short-lived and overlap (rather than one endless `messages()` stream):
/// the next is made while the newest is half spent, so the server always has one waiting,
/// even when it ends a pull without saying so (NATS 2.9.10 often sends no 408 for a pull
/// that expired after delivering something; waiting for its end stalled delivery for the
/// margin, a second, until the next pull). After NATS restarts, the consumer is pulling
/// again within seconds. This loop only ends on cancellation.
///
/// Cancellation drains: no new pull is made, and what the open ones bring until they end
/// (within `PULL_EXPIRES` + `PULL_MARGIN`) is handled. JetStream counts every message a pull
/// brought as delivered to this replica, so one dropped unhandled would reach another
/// replica only after the ack wait. Naking those instead falls short on NATS 2.9.10: the
/// pull outlives its subscriber at the server until it expires, and in tests the first
/// message naked went to it and waited out the ack wait all the same.
pub async fn consume<F, Fut>(
    consumer: consumer::PullConsumer,
    batch: usize,
    linger: Duration,
    cancel: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<jetstream::Message>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut pulls = Pulls::default();
    let mut backoff = Duration::from_millis(100);
    let mut retry_at = Instant::now();
    loop {
        let stopping = cancel.is_cancelled();
        let now = Instant::now();
        if !stopping && now >= retry_at && pulls.renew_at().is_none_or(|at| at <= now) {
            let pull = consumer
                .batch()
                .max_messages(PULL_MAX)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            match pull {
                Ok(messages) => {
                    pulls.open(messages);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull from JetStream; retrying");
                    retry_at = now + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if stopping && pulls.is_empty() {
            return;
        }
        let renew = pulls.renew_at().map_or(retry_at, |at| at.max(retry_at));
        let over = pulls.over_at();
        let mut ready = tokio::select! {
            biased;
            ready = pulls.ready(batch) => ready,
            () = cancel.cancelled(), if !stopping => continue,
            () = tokio::time::sleep_until(renew), if !stopping => continue,
            () = tokio::time::sleep_until(over.unwrap_or(now)), if over.is_some() => continue,
        };
        if ready.is_empty() {
            continue;
        }
        if !linger.is_zero() {
            // More may join until the linger is over.
            let until = Instant::now() + linger;
            while ready.len() < batch {
                match tokio::time::timeout_at(until, pulls.ready(batch - ready.len())).await {
                    Ok(more) => ready.extend(more),
                    Err(_) => break,
                }
            }
        }
        handle(ready).await;
    }
}

/// The pull requests a consumer has open, oldest first: the server serves them in that
/// order, so messages are handed on in stream order.
#[derive(Default)]
struct Pulls {
    open: VecDeque<Pull>,
}

struct Pull {
    messages: consumer::pull::Batch,
    made: Instant,
    received: usize,
}

impl Pulls {
    fn open(&mut self, messages: consumer::pull::Batch) {
        self.open.push_back(Pull {
            messages,
            made: Instant::now(),
            received: 0,
        });
    }

    fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// When the next pull is due: once the newest is half spent, by time or by count, so
    /// that one is always waiting at the server (at most four are open while none fills
    /// up: one lives `PULL_EXPIRES` + `PULL_MARGIN`, and one is made every
    /// `PULL_EXPIRES / 2`). `None` when none is open: at once.
    fn renew_at(&self) -> Option<Instant> {
        let newest = self.open.back()?;
        Some(if newest.received >= PULL_MAX / 2 {
            newest.made
        } else {
            newest.made + PULL_EXPIRES / 2
        })
    }

    /// When the oldest pull is over whatever the server said: by then all it delivered has
    /// arrived.
    fn over_at(&self) -> Option<Instant> {
        self.open
            .front()
            .map(|oldest| oldest.made + PULL_EXPIRES + PULL_MARGIN)
    }

    /// Up to `max` messages that have arrived, from the oldest pull first. Empty when a pull
    /// ended and none arrived; waits while neither happens.
    async fn ready(&mut self, max: usize) -> Vec<jetstream::Message> {
        std::future::poll_fn(|cx| self.poll_ready(cx, max)).await
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Vec<jetstream::Message>> {
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut ended = false;
        let mut i = 0;
        while i < self.open.len() && ready.len() < max {
            let pull = &mut self.open[i];
            let over = loop {
                if ready.len() >= max {
                    break false;
                }
                match pull.messages.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(m))) => {
                        pull.received += 1;
                        ready.push(m);
                    }
                    // The pull goes on, or ends and another is made.
                    Poll::Ready(Some(Err(e))) => {
                        tracing::warn!(error = %e, "JetStream pull interrupted");
                    }
                    Poll::Ready(None) => break true,
                    // Ended unannounced (NATS 2.9.10 often sends no 408 for a pull that
                    // expired after delivering something; a pull lost to a NATS restart
                    // says nothing at all): what had arrived is taken above.
                    Poll::Pending if now >= pull.made + PULL_EXPIRES + PULL_MARGIN => {
                        tracing::debug!("a pull ended unannounced");
                        break true;
                    }
                    Poll::Pending => break false,
                }
            };
            if over {
                self.open.remove(i);
                ended = true;
            } else {
                i += 1;
            }
        }
        if ready.is_empty() && !ended {
            Poll::Pending
        } else {
            Poll::Ready(ready)
        }
    }
}

/// Handles each message of `sub` with `handle`, up to `concurrency` at once, until `cancel`
/// fires; then unsubscribes and waits for the handlers in flight.
pub async fn serve<F, Fut>(
    mut sub: async_nats::Subscriber,
    concurrency: usize,
    cancel: CancellationToken,
    handle: F,
) where
    F: Fn(async_nats::Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let msg = tokio::select! {
            () = cancel.cancelled() => break,
            msg = sub.next() => match msg {
                Some(m) => m,
                None => break,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let work = handle(msg);
        tasks.spawn(async move {
            work.await;
            drop(permit);
        });
    }
    let _ = sub.unsubscribe().await;
    tasks.close();
    tasks.wait().await;
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The service answered with an error of the protocol: pass it on.
    #[error("{}: {}", .0.code, .0.message)]
    Remote(ErrorBody),
    #[error("no {0} is running")]
    NoResponders(&'static str),
    #[error("{0} did not answer in time")]
    Timeout(&'static str),
    #[error("request to {service}: {message}")]
    Other {
        service: &'static str,
        message: String,
    },
}

/// Sends `req` as JSON with the current trace context and decodes the `Reply`.
/// `service` names the answering service in errors.
pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
    client: &Client,
    service: &'static str,
    subject: String,
    req: &Req,
    timeout: Duration,
) -> Result<Resp, RequestError> {
    let payload = serde_json::to_vec(req).map_err(|e| RequestError::Other {
        service,
        message: e.to_string(),
    })?;
    let request = async_nats::Request::new()
        .payload(payload.into())
        .headers(telemetry::headers())
        .timeout(Some(timeout));
    let answer = client
        .send_request(subject, request)
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => RequestError::NoResponders(service),
            async_nats::RequestErrorKind::TimedOut => RequestError::Timeout(service),
            _ => RequestError::Other {
                service,
                message: e.to_string(),
            },
        })?;
    let reply: Reply<Resp> =
        serde_json::from_slice(&answer.payload).map_err(|e| RequestError::Other {
            service,
            message: format!("undecodable reply: {e}"),
        })?;
    reply.into_result().map_err(RequestError::Remote)
}

/// Answers a request with `reply` as JSON. A request without a reply subject is ignored.
pub async fn respond<T: Serialize>(client: &Client, reply_to: Option<&str>, reply: &Reply<T>) {
    let Some(reply_to) = reply_to else { return };
    match serde_json::to_vec(reply) {
        Ok(bytes) => {
            if let Err(e) = client.publish(reply_to.to_owned(), bytes.into()).await {
                tracing::warn!(error = %e, "cannot send a reply");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode a reply"),
    }
}

/// Publishes `value` as JSON on core NATS with the current trace context (fire and forget:
/// for events whose loss the design tolerates, such as live pushes and typing).
pub async fn publish_json<T: Serialize>(client: &Client, subject: String, value: &T) {
    let bytes = match serde_json::to_vec(value) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an event");
            return;
        }
    };
    if let Err(e) = client
        .publish_with_headers(subject, telemetry::headers(), bytes.into())
        .await
    {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// Takes a stream message that can never be processed out of the way: logs it, copies its
/// payload to `dead_letter` (a subject an operator can watch or capture into a stream), and
/// terminates it so that JetStream does not redeliver it.
pub async fn dead_letter(
    client: &Client,
    dead_letter: String,
    msg: &jetstream::Message,
    reason: &str,
) {
    tracing::error!(subject = %msg.subject, bytes = msg.payload.len(), reason, "undecodable stream message; dead-lettered");
    if let Err(e) = client.publish(dead_letter, msg.payload.clone()).await {
        tracing::warn!(error = %e, "cannot publish to the dead-letter subject");
    }
    if let Err(e) = msg.ack_with(jetstream::AckKind::Term).await {
        tracing::warn!(error = %e, "cannot terminate a message");
    }
}

/// Headers for a JetStream publish: trace context plus the de-duplication id.
pub fn dedup_headers(msg_id: &str) -> HeaderMap {
    let mut h = telemetry::headers();
    h.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    h
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn passwords_and_tokens_never_show() {
        assert_eq!(
            redacted_url("nats://u:secret@a:4222, tls://tok3n@b,c:4223,nats://d"),
            "nats://u:***@a:4222,tls://***@b,c:4223,nats://d"
        );
        assert_eq!(redacted_url("u:p@host"), "u:***@host");
    }
}
