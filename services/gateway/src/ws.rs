//! WebSocket sessions (`GET /ws`).
//!
//! A connection is up to three tasks: a writer that owns the socket's sink and drains a
//! bounded queue of outbound frames; a sender that publishes what the client sends, in
//! order, and answers `sent` as JetStream confirms (see [`crate::send`]), started with the
//! client's first frame that needs it (most connections sit idle: they cost no task and no
//! queue for it); and the connection loop here, which reads the client's frames, receives
//! the user's events from NATS and replays the backlog. Connecting follows DESIGN.md's
//! order (subscribe and wait until NATS has the subscription, announce the session, then
//! query the backlog), which is why no message falls between the backlog and live delivery.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chat_proto::envelope::{Backlog, Page};
use chat_proto::frame::{ClientFrame, ServerFrame, parse_client_frame};
use chat_proto::limits::BACKLOG_PAGE;
use chat_proto::{ErrorCode, StoreOp, UserId};
use chat_runtime::telemetry;
use futures::StreamExt;
use futures::stream::{SplitSink, SplitStream};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::AppState;
use crate::auth::bearer;
use crate::error::ApiError;
use crate::events::Subscription;
use crate::ids::RecentIds;
use crate::meters;
use crate::send::{self, Outgoing};
use crate::socket;

/// The server pings this often ...
const PING_EVERY: Duration = Duration::from_secs(25);
/// ... and drops a client it has heard nothing from for this long.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// Ids remembered per connection to drop the second copy of a message.
const RECENT_IDS: usize = 4096;
/// Client frames waiting for the sender task before the client is told `rate_limited`.
const OUTGOING_QUEUE: usize = 256;
/// The catch-ups of a gateway's sockets after NATS came back start within this time.
const CATCH_UP_SPREAD: Duration = Duration::from_secs(2);
/// Longest wait for the socket to take a backlog frame before the client counts as stuck.
const BACKLOG_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Close code when the socket's token expires (application range 4000-4999).
pub const TOKEN_EXPIRED: u16 = 4001;

#[derive(Deserialize)]
pub(crate) struct TokenParam {
    token: Option<String>,
}

/// Checks the token (header, or `?token=` for browsers) before upgrading: 401 otherwise.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<TokenParam>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let from_query = query.ok().and_then(|Query(q)| q.token);
    let token = bearer(&headers).map(str::to_owned).or(from_query);
    let Some((user, expires)) = token.and_then(|t| state.tokens.verify_until(&t)) else {
        return ApiError::new(ErrorCode::Unauthorized, "a valid token is required").into_response();
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    // Held for the connection's life, so shutdown can wait for every socket to close.
    let alive = state.connections.token();
    socket::configure(ws).on_upgrade(move |ws| {
        // Split here, not in `run`: a socket passed into an async fn stays in its state
        // (~900 bytes) for the connection's life even after it is split.
        let (sink, stream) = ws.split();
        async move {
            run(state, sink, stream, user, expires).await;
            drop(alive);
        }
    })
}

/// Why a connection ended, and the close frame it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed or vanished: nothing to send.
    ClientGone,
    /// A frame over the 64 KiB limit.
    TooBig,
    /// The gateway is stopping: reconnect elsewhere.
    Shutdown,
    /// The client did not read its frames fast enough.
    SlowReader,
    /// Nothing heard within the silence limit.
    Silent,
    /// The token the socket was opened with expired: log in again.
    TokenExpired,
    /// NATS or the store failed us.
    Internal,
}

impl End {
    fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::ClientGone => return None,
            End::TooBig => (1009, "frame larger than 64 KiB"),
            End::Shutdown => (1001, "server going away; reconnect"),
            End::SlowReader => (1008, "not reading fast enough; reconnect"),
            End::Silent => (1001, "no answer to pings"),
            End::TokenExpired => (TOKEN_EXPIRED, "token expired; log in again"),
            End::Internal => (1011, "internal error; reconnect"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        })
    }
}

/// What the backlog task hands the connection loop.
enum BacklogEvent {
    Page(Vec<chat_proto::Message>),
    Done,
}

struct Connection {
    state: AppState,
    user: UserId,
    out: flume::Sender<WsMessage>,
    /// The sender task's queue, once the client has sent something to publish.
    outgoing: Option<(mpsc::Sender<Outgoing>, tokio::task::JoinHandle<()>)>,
    seen: RecentIds,
    /// Events that arrive while the backlog replays, pushed after it in arrival order;
    /// `None` once the backlog is done.
    held: Option<Vec<async_nats::Message>>,
    replayed: u64,
    limiter: DefaultDirectRateLimiter,
    last_heard: Instant,
}

async fn run(
    state: AppState,
    sink: SplitSink<WebSocket, WsMessage>,
    stream: SplitStream<WebSocket>,
    user: UserId,
    expires: u64,
) {
    let session_id = Uuid::new_v4().to_string();
    let span = tracing::info_span!(
        target: telemetry::LOGS_ONLY,
        "gateway.connection",
        user_id = user,
        session_id = %session_id
    );
    async {
        let (out, out_rx) = socket::queue(state.config.outbound_queue);
        let writer = tokio::spawn(socket::write_loop(sink, out_rx));

        // Taken before subscribing: a NATS outage from here on is caught up on (see `serve`).
        let mut reconnected = state.events.reconnects();
        reconnected.mark_unchanged();
        // Boxed: the connect steps' futures are large (the settle queries alone take ~2.6 KiB)
        // and, left inline, would size every connection's task for its whole life.
        let Some(sub) = Box::pin(open(&state, user, &session_id, &out)).await else {
            return finish(writer, out, End::Internal).await;
        };
        // (c) Only then ask for what was waiting.
        let backlog = backlog_feed(&state, user, Duration::ZERO);
        let rate =
            std::num::NonZeroU32::new(state.config.send_rate.max(1)).expect("max(1) is non-zero");
        let burst =
            std::num::NonZeroU32::new(state.config.send_burst.max(1)).expect("max(1) is non-zero");
        let mut conn = Connection {
            state: state.clone(),
            user,
            out: out.clone(),
            outgoing: None,
            seen: RecentIds::new(RECENT_IDS),
            held: Some(Vec::new()),
            replayed: 0,
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            last_heard: Instant::now(),
        };
        conn.seen.set_grow(true);
        let left = Duration::from_secs(expires)
            .saturating_sub(Duration::from_millis(chat_proto::now_ms() as u64));
        let end = conn.serve(stream, sub, backlog, reconnected, left).await;
        tracing::debug!(?end, "connection ends");

        if let Some((_, sender)) = conn.outgoing.take() {
            sender.abort();
        }
        // Boxed like the connect steps: inline, it would be the largest state of the task.
        Box::pin(state.session_down(user, &session_id)).await;
        drop(conn);
        finish(writer, out, end).await;
    }
    .instrument(span)
    .await;
}

/// Connects the session in DESIGN.md's order up to the backlog: (a) subscribes to the user's
/// events and waits until NATS has the subscription, says `hello`, waits for the pipeline to
/// settle, then (b) announces the session. `None` when the subscription fails.
async fn open(
    state: &AppState,
    user: UserId,
    session_id: &str,
    out: &flume::Sender<WsMessage>,
) -> Option<Subscription> {
    // (a) Subscribe, in effect at the server once this returns, so every event from here on
    // reaches us ...
    let sub = match state.events.subscribe(state.subjects.user(user)).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::debug!(error = %e, "cannot subscribe to the user's events");
            return None;
        }
    };
    let hello = ServerFrame::Hello {
        user_id: user,
        session_id: session_id.to_owned(),
        server_time: chat_proto::now_ms(),
    };
    let _ = out.send_async(text(hello.to_json())).await;
    // Let what was sent before this connect be stored, then (b) announce the session. Done
    // here, not in the backlog task, so that the announcement has been answered before a
    // quick disconnect's `session_down` can overtake it.
    state.settle().await;
    state.session_up(user, session_id).await;
    Some(sub)
}

/// Sends the close frame (when there is one) and lets the writer drain, within a bound.
async fn finish(writer: tokio::task::JoinHandle<()>, out: flume::Sender<WsMessage>, end: End) {
    if let Some(frame) = end.close_frame() {
        let _ = out.try_send(WsMessage::Close(Some(frame)));
    }
    drop(out);
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}

fn text(json: String) -> WsMessage {
    WsMessage::Text(Utf8Bytes::from(json))
}

/// Pages through the backlog, retrying while the store is unavailable (the client waits for
/// `backlog_done`; a gap is never an option).
async fn fetch_backlog(state: AppState, user: UserId, tx: mpsc::Sender<BacklogEvent>) {
    let mut after: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = Backlog {
            user_id: user,
            after: after.clone(),
            limit: BACKLOG_PAGE,
        };
        let page: Page = match state.store(StoreOp::Backlog, &req).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "backlog unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        after = page.messages.last().map(|m| m.msg_id.clone()).or(after);
        let more = page.has_more && !page.messages.is_empty();
        if tx.send(BacklogEvent::Page(page.messages)).await.is_err() {
            return;
        }
        if !more {
            let _ = tx.send(BacklogEvent::Done).await;
            return;
        }
    }
}

/// The backlog task's queue, and the task (aborted if the connection ends first).
type BacklogFeed = (mpsc::Receiver<BacklogEvent>, AbortOnDropHandle<()>);

/// Starts paging through `user`'s backlog after `delay`.
fn backlog_feed(state: &AppState, user: UserId, delay: Duration) -> BacklogFeed {
    let (tx, rx) = mpsc::channel(2);
    // The replay is a trace of its own (its store requests are its children), linked in the
    // logs to the connection by user id.
    let replay = tracing::info_span!(parent: None, "gateway.backlog", user_id = user);
    let fetch = fetch_backlog(state.clone(), user, tx);
    let task = tokio::spawn(
        async move {
            tokio::time::sleep(delay).await;
            fetch.await;
        }
        .instrument(replay),
    );
    (rx, AbortOnDropHandle::new(task))
}

/// The backlog task's next event; never, once the backlog is done.
async fn next_page(backlog: &mut Option<BacklogFeed>) -> Option<BacklogEvent> {
    match backlog {
        Some((rx, _)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[derive(Deserialize)]
struct EventHead {
    #[serde(rename = "type")]
    kind: String,
    msg_id: Option<String>,
    to: Option<UserId>,
    ts: Option<i64>,
}

impl Connection {
    async fn serve(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        sub: Subscription,
        backlog: BacklogFeed,
        mut reconnected: tokio::sync::watch::Receiver<u64>,
        token_left: Duration,
    ) -> End {
        // Dropped once the backlog is done: an idle connection keeps no queue for it, nor
        // the finished task (a task's memory lives as long as a handle to it).
        let mut backlog = Some(backlog);
        let expiry = tokio::time::sleep(token_left);
        tokio::pin!(expiry);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let cancel = self.state.cancel.clone();
        loop {
            let step = tokio::select! {
                () = cancel.cancelled() => Err(End::Shutdown),
                () = &mut expiry => Err(End::TokenExpired),
                frame = stream.next() => match frame {
                    None => Err(End::ClientGone),
                    Some(Err(e)) => Err(read_error(e)),
                    Some(Ok(msg)) => {
                        self.last_heard = Instant::now();
                        self.on_client(msg)
                    }
                },
                event = sub.next() => match event {
                    Some(m) => self.on_event(m),
                    // The event connection stops with the gateway.
                    None if cancel.is_cancelled() => Err(End::Shutdown),
                    None => Err(End::Internal),
                },
                event = next_page(&mut backlog) => match event {
                    // Boxed, as it lives only while a page replays.
                    Some(BacklogEvent::Page(messages)) => Box::pin(self.replay(messages)).await,
                    Some(BacklogEvent::Done) => {
                        backlog = None;
                        Box::pin(self.backlog_done()).await
                    }
                    None => Err(End::Internal),
                },
                // NATS was away: what was published for this user meanwhile is gone. What
                // of it matters, messages not yet delivered, comes from the backlog again
                // (the subscription is back in effect first, so nothing falls between);
                // this socket already has most of it and drops those by id.
                // Every socket of the gateway does so at once: spread over a moment, so the
                // store gets no burst of thousands of queries.
                Ok(()) = reconnected.changed() => {
                    meters::caught_up();
                    let delay = CATCH_UP_SPREAD.mul_f64(rand::random::<f64>());
                    backlog = Some(backlog_feed(&self.state, self.user, delay));
                    Ok(())
                }
                _ = ping.tick() => {
                    if self.last_heard.elapsed() > SILENCE_LIMIT {
                        Err(End::Silent)
                    } else {
                        self.push(WsMessage::Ping(Bytes::new()))
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Queues a frame for the socket. A full queue means the client stopped reading: it is
    /// dropped rather than slowing anyone else down (it reconnects and replays its backlog).
    fn push(&self, msg: WsMessage) -> Result<(), End> {
        match self.out.try_send(msg) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full(_)) => {
                tracing::info!("client is not reading; dropping the connection");
                Err(End::SlowReader)
            }
            Err(flume::TrySendError::Disconnected(_)) => Err(End::ClientGone),
        }
    }

    fn push_frame(&self, frame: ServerFrame) -> Result<(), End> {
        meters::frame_out(&frame);
        self.push(text(frame.to_json()))
    }

    fn on_client(&mut self, msg: WsMessage) -> Result<(), End> {
        match msg {
            WsMessage::Text(t) => self.on_text(t.as_str()),
            WsMessage::Binary(_) => self.push_frame(ServerFrame::error(
                ErrorCode::BadRequest,
                "frames are JSON text; binary frames are not accepted",
                None,
            )),
            WsMessage::Close(_) => Err(End::ClientGone),
            WsMessage::Ping(_) | WsMessage::Pong(_) => Ok(()),
        }
    }

    fn on_text(&mut self, text: &str) -> Result<(), End> {
        let frame = match parse_client_frame(text) {
            Ok(f) => f,
            Err(e) => {
                meters::frame_in("invalid");
                return self.push_frame(e.into_frame());
            }
        };
        meters::frame_in(frame.kind());
        let limited = |client_id| {
            ServerFrame::error(
                ErrorCode::RateLimited,
                "slow down: too many frames",
                client_id,
            )
        };
        let item = match frame {
            ClientFrame::Ping => return self.push_frame(ServerFrame::Pong),
            ClientFrame::Send(s) => {
                if self.limiter.check().is_err() {
                    return self.push_frame(limited(Some(s.client_id)));
                }
                if s.to == self.user {
                    return self.push_frame(ServerFrame::error(
                        ErrorCode::UnknownRecipient,
                        "you cannot send a message to yourself",
                        Some(s.client_id),
                    ));
                }
                let id = self.state.ids.next();
                // Our own message will come back on the user subject (for the sender's
                // other devices); this device already knows it.
                self.seen.insert(id);
                Outgoing::Send { id, send: s }
            }
            ClientFrame::Typing { to } => {
                if self.limiter.check().is_err() {
                    return self.push_frame(limited(None));
                }
                Outgoing::Typing { to }
            }
            ClientFrame::Ack { msg_ids } => Outgoing::Ack { msg_ids },
            ClientFrame::Read { peer, up_to } => Outgoing::Read { peer, up_to },
        };
        let (outgoing, _) = self.outgoing.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
            let run = send::run(self.state.clone(), self.user, rx, self.out.clone());
            (tx, tokio::spawn(run.in_current_span()))
        });
        match outgoing.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.push_frame(limited(item.client_id()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Internal),
        }
    }

    /// An event for this user from NATS: held during the backlog replay, else pushed unless
    /// it is a message this connection already has.
    fn on_event(&mut self, event: async_nats::Message) -> Result<(), End> {
        if let Some(held) = &mut self.held {
            held.push(event);
            return Ok(());
        }
        match self.event_frame(event) {
            Some((frame, span)) => span.in_scope(|| self.push(frame)),
            None => Ok(()),
        }
    }

    /// The frame an event becomes on this socket, with the span of its push; `None` when it
    /// cannot be read or is a message this connection already has.
    fn event_frame(&mut self, event: async_nats::Message) -> Option<(WsMessage, tracing::Span)> {
        let head: EventHead = match serde_json::from_slice(&event.payload) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable user event");
                return None;
            }
        };
        let span = if head.kind == "message" {
            let id = head
                .msg_id
                .as_deref()
                .and_then(|id| Uuid::try_parse(id).ok())?;
            if !self.seen.insert(id) {
                return None;
            }
            if let (Some(ts), Some(to)) = (head.ts, head.to)
                && to == self.user
            {
                meters::delivered_live(ts);
            }
            // The last hop of the message's trace: a root span made the child of the context
            // the router or store sent along.
            let span = tracing::info_span!(parent: None, "gateway.push", msg_id = %id, user_id = self.user);
            telemetry::extract(event.headers.as_ref(), &span);
            span
        } else {
            tracing::Span::none()
        };
        meters::frame_out_kind(meters::event_kind(&head.kind));
        let text = Utf8Bytes::try_from(event.payload).ok()?;
        Some((WsMessage::Text(text), span))
    }

    async fn replay(&mut self, messages: Vec<chat_proto::Message>) -> Result<(), End> {
        for m in messages {
            let Ok(id) = Uuid::try_parse(&m.msg_id) else {
                continue;
            };
            if !self.seen.insert(id) {
                continue;
            }
            self.replayed += 1;
            meters::replayed();
            meters::frame_out_kind("message");
            self.push_waiting(text(ServerFrame::Message(m).to_json()))
                .await?;
        }
        Ok(())
    }

    /// The end of the connect's backlog: `backlog_done`, then what was held meanwhile. The
    /// end of a catch-up after a NATS outage says nothing: the client had its
    /// `backlog_done`.
    async fn backlog_done(&mut self) -> Result<(), End> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let done = ServerFrame::BacklogDone {
            count: self.replayed,
        };
        meters::frame_out(&done);
        // These wait for room too: the replay's last frames may just have filled the queue.
        self.push_waiting(text(done.to_json())).await?;
        for event in held {
            if let Some((frame, span)) = self.event_frame(event) {
                self.push_waiting(frame).instrument(span).await?;
            }
        }
        self.seen.set_grow(false);
        Ok(())
    }

    /// Queues a frame of the backlog (or of what was held while it replayed), waiting for
    /// room in the queue: a client reading a long backlog is not a slow reader unless the
    /// socket takes nothing for `BACKLOG_WRITE_TIMEOUT`.
    async fn push_waiting(&self, msg: WsMessage) -> Result<(), End> {
        match tokio::time::timeout(BACKLOG_WRITE_TIMEOUT, self.out.send_async(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => Err(End::SlowReader),
        }
    }
}

/// A read error: the 64 KiB limit closes with 1009; anything else means the client is gone.
fn read_error(e: axum::Error) -> End {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => End::TooBig,
        _ => End::ClientGone,
    }
}
