//! Every connected user's events from NATS, on a connection of the gateway's own.
//!
//! A socket receives its user's events (`<ns>.user.<id>`: messages, receipts, presence,
//! typing) through a subscription made before its backlog is queried (`ws.rs`). With
//! async-nats every subscription is a `Subscriber` whose tokio channel allocates 32 slots of
//! the 184-byte `async_nats::Message` when it is made: 5.9 KiB of every idle connection, more
//! than half of what one cost (docs/benchmarks.md), and async-nats has no way to let
//! subscriptions share a queue. So the gateway keeps one more NATS connection, spoken here in
//! NATS's client protocol (text lines: `SUB`, `UNSUB`, `PING` out; `MSG`, `HMSG`, `PING`, `PONG`
//! in), that holds every connected user's subscription and hands each message to the queue of
//! the subscription it names, a queue that allocates only while events wait in it. Interest
//! stays per user at the server, so a gateway still gets only its own users' events.
//!
//! What it keeps of async-nats's behaviour: a subscription is in effect when
//! [`UserEvents::subscribe`] returns (its `SUB` was followed by a `PING` whose `PONG` came back,
//! and a server handles one connection's commands in order); after losing the server it
//! connects again (at once, then every 250 ms, trying each server of the URL in turn), sends
//! every subscription again and, once they are in effect, counts a reconnect
//! ([`UserEvents::reconnects`]): core NATS keeps nothing for a subscriber that is away, so
//! every socket then catches up from the backlog. A server that answers no `PING` for
//! [`PING_EVERY`] × [`PINGS_UNANSWERED`] counts as lost. It speaks TLS as async-nats does with
//! a `tls://` URL or a server that requires it (rustls with ring, the platform's trusted roots,
//! `SSL_CERT_FILE` among them); it does not speak credentials other than a user and password
//! or a token in the URL (nkeys, credentials files, client certificates), which the services'
//! `NATS_URL` cannot carry either.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Message;
use async_nats::header::{HeaderMap, HeaderName};
use bytes::{Buf, Bytes, BytesMut};
use chat_runtime::nats::{RECONNECT_WAIT, redacted_url};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

use crate::meters;

/// Events waiting in one subscription's queue before its socket counts as not keeping up
/// (async-nats's default for a subscription). The queue grows only as events wait.
const QUEUE: usize = 64 * 1024;
/// How long reaching a server and its greeting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The gateway asks the server for a `PONG` this often ...
const PING_EVERY: Duration = Duration::from_secs(10);
/// ... and counts it as lost when this many went unanswered.
const PINGS_UNANSWERED: u32 = 2;
/// While NATS is away, why a reconnect failed is logged at `warn` every this many rounds
/// (one round tries every server, every [`RECONNECT_WAIT`]: about every 10 s).
const WARN_EVERY_ROUNDS: u32 = 40;
/// The longest control line taken (`MSG` lines are a subject and three numbers).
const MAX_LINE: usize = 4096;
/// Room made in the read buffer before each read (the buffer is reused: `next_op` copies
/// each payload out of it).
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach NATS at {url} for the users' events: {reason}")]
    Connect { url: String, reason: String },
}

/// The handle the sockets use; the connection itself is [`Link`], run as a task.
pub(crate) struct UserEvents {
    commands: mpsc::UnboundedSender<Command>,
    next_sid: AtomicU64,
    reconnects: watch::Receiver<u64>,
    connected: watch::Receiver<bool>,
}

/// One user's events for one socket. Dropping it ends the subscription at the server.
pub(crate) struct Subscription {
    sid: u64,
    events: flume::Receiver<Message>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The next event; `None` once the subscription ended: the gateway is stopping, or the
    /// socket did not take its events (its queue filled), and then it must reconnect.
    pub(crate) async fn next(&self) -> Option<Message> {
        self.events.recv_async().await.ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe(self.sid));
    }
}

enum Command {
    Subscribe {
        sid: u64,
        subject: String,
        queue: flume::Sender<Message>,
        in_effect: oneshot::Sender<()>,
    },
    Unsubscribe(u64),
}

/// The event connection is gone: the gateway is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the users' event connection has stopped")]
pub(crate) struct Stopped;

impl UserEvents {
    /// Connects to the first server of `url` that answers (an error if none does, so a
    /// gateway started against a wrong URL says so), and returns the handle and the
    /// connection, which [`Link::run`] serves until the gateway stops.
    pub(crate) async fn connect(url: &str, name: &str) -> Result<(Arc<UserEvents>, Link), Error> {
        let error = |reason: String| Error::Connect {
            url: redacted_url(url),
            reason,
        };
        let servers = servers(url).map_err(error)?;
        let (first, _) = reach(&servers, name).await.map_err(error)?;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (reconnects_tx, reconnects) = watch::channel(0);
        let (connected_tx, connected) = watch::channel(true);
        let events = Arc::new(UserEvents {
            commands,
            next_sid: AtomicU64::new(1),
            reconnects,
            connected,
        });
        let link = Link {
            servers,
            name: name.to_owned(),
            first: Some(first),
            commands: commands_rx,
            subs: HashMap::new(),
            asked: Vec::new(),
            pings: VecDeque::new(),
            unanswered: 0,
            reconnects: reconnects_tx,
            connected: connected_tx,
        };
        Ok((events, link))
    }

    /// Subscribes to `subject`; returns once the server has the subscription, so whatever is
    /// published to it from then on reaches the subscription. While the server is away it
    /// waits until the connection is back.
    pub(crate) async fn subscribe(&self, subject: String) -> Result<Subscription, Stopped> {
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        let (queue, events) = flume::bounded(QUEUE);
        let (in_effect, effective) = oneshot::channel();
        self.commands
            .send(Command::Subscribe {
                sid,
                subject,
                queue,
                in_effect,
            })
            .map_err(|_| Stopped)?;
        // Made before waiting: a socket that goes while it waits ends the subscription too.
        let subscription = Subscription {
            sid,
            events,
            commands: self.commands.clone(),
        };
        effective.await.map_err(|_| Stopped)?;
        Ok(subscription)
    }

    /// A receiver that changes each time the connection is back after losing its server and
    /// every subscription is in effect again: what was published meanwhile is gone.
    pub(crate) fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.clone()
    }

    /// Whether the connection has its server now.
    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }
}

/// A NATS server of the URL, and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    host: String,
    port: u16,
    auth: Auth,
    /// `tls://`: TLS whatever the server says (it is also spoken when the server requires it).
    tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    None,
    User { user: String, pass: String },
    Token(String),
}

/// The servers of a NATS URL as async-nats takes it: comma-separated, `nats://` optional
/// (`tls://` for TLS), port 4222 by default, `user:password@` or `token@`.
fn servers(url: &str) -> Result<Vec<Server>, String> {
    url.split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
        .map(|one| {
            let full = if one.contains("://") {
                one.to_owned()
            } else {
                format!("nats://{one}")
            };
            let shown = redacted_url(one);
            let parsed = url::Url::parse(&full).map_err(|e| format!("{shown}: {e}"))?;
            let tls = match parsed.scheme() {
                "nats" => false,
                "tls" => true,
                other => {
                    return Err(format!(
                        "{shown}: {other}:// is not spoken on this connection (nats:// and tls:// are)"
                    ));
                }
            };
            let host = parsed
                .host_str()
                .ok_or_else(|| format!("{shown}: no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let auth = match (parsed.username(), parsed.password()) {
                ("", _) => Auth::None,
                (user, Some(pass)) => Auth::User {
                    user: user.to_owned(),
                    pass: pass.to_owned(),
                },
                (token, None) => Auth::Token(token.to_owned()),
            };
            Ok(Server {
                host,
                port: parsed.port().unwrap_or(4222),
                auth,
                tls,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|list| {
            if list.is_empty() {
                Err("no server in the URL".to_owned())
            } else {
                Ok(list)
            }
        })
}

/// A connection to NATS: TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open connection whose greeting is done: its stream and what was read past the `PONG`.
type Open = (Box<dyn Io>, BytesMut);

/// The TLS client settings, made once: async-nats's defaults (ring, the platform's roots,
/// which include `SSL_CERT_FILE`), so that this connection trusts what the others trust.
fn tls_connector() -> Result<TlsConnector, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<ClientConfig>, String>> =
        std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
            return Err(format!(
                "no trusted root certificate found for TLS ({})",
                errors.join("; ")
            ));
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    });
    config.clone().map(TlsConnector::from)
}

/// Connects and logs in: the server's `INFO`, our `CONNECT` and a `PING`, its `PONG`.
async fn handshake(server: &Server, name: &str) -> Result<Open, String> {
    let at = format!("{}:{}", server.host, server.port);
    let greet = async {
        let mut tcp = TcpStream::connect((server.host.as_str(), server.port))
            .await
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let info = read_line(&mut tcp, &mut buf).await?;
        let info = info
            .strip_prefix("INFO ")
            .ok_or_else(|| format!("the server greeted with {info:?}"))?;
        let info: serde_json::Value = serde_json::from_str(info).map_err(|e| e.to_string())?;
        let tls = server.tls || info["tls_required"] == serde_json::Value::Bool(true);
        let mut io: Box<dyn Io> = if tls {
            // The server says nothing more until the client's TLS handshake.
            if !buf.is_empty() {
                return Err("the server sent more than its INFO before TLS".into());
            }
            let name = ServerName::try_from(server.host.clone()).map_err(|e| e.to_string())?;
            let stream = tls_connector()?
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "headers": true,
            "no_responders": false,
            "echo": false,
            "tls_required": tls,
            "name": name,
        });
        match &server.auth {
            Auth::None => {}
            Auth::User { user, pass } => {
                connect["user"] = user.as_str().into();
                connect["pass"] = pass.as_str().into();
            }
            Auth::Token(token) => connect["auth_token"] = token.as_str().into(),
        }
        io.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let line = read_line(&mut io, &mut buf).await?;
            match line.split_whitespace().next().unwrap_or("") {
                "PONG" => return Ok((io, buf)),
                "PING" => io.write_all(b"PONG\r\n").await.map_err(|e| e.to_string())?,
                "-ERR" => return Err(format!("the server said {line}")),
                _ => {}
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, greet).await {
        Ok(Ok(open)) => Ok(open),
        Ok(Err(reason)) => Err(format!("{at}: {reason}")),
        Err(_) => Err(format!("{at}: no greeting within {CONNECT_TIMEOUT:?}")),
    }
}

/// The first of `servers` that answers and takes our login, tried in turn; else why none did.
async fn reach<'a>(servers: &'a [Server], name: &str) -> Result<(Open, &'a Server), String> {
    let mut reasons = Vec::new();
    for server in servers {
        match handshake(server, name).await {
            Ok(open) => return Ok((open, server)),
            Err(reason) => reasons.push(reason),
        }
    }
    Err(reasons.join("; "))
}

/// Reads one control line of the greeting (without its CRLF).
async fn read_line(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<String, String> {
    loop {
        if let Some(end) = find_crlf(buf) {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.advance(end + 2);
            return Ok(line);
        }
        if buf.len() > MAX_LINE {
            return Err("a control line too long".into());
        }
        buf.reserve(READ_CHUNK);
        if io.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// What the server sent, one protocol operation.
#[derive(Debug)]
enum Op {
    /// A message for subscription `sid`.
    Msg {
        sid: u64,
        message: Message,
    },
    Ping,
    Pong,
    /// `+OK`, `INFO` (the cluster changed): nothing to do.
    Other,
    /// `-ERR`: the server closes the connection after most.
    Err(String),
}

/// Takes the next whole operation off `buf`; `None` when more must be read first.
fn next_op(buf: &mut BytesMut) -> Result<Option<Op>, String> {
    let Some(end) = find_crlf(buf) else {
        return if buf.len() > MAX_LINE {
            Err("a control line too long".into())
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "a control line not UTF-8")?;
    let mut words = line.split_ascii_whitespace();
    let op = words.next().unwrap_or("");
    let is = |name: &str| op.eq_ignore_ascii_case(name);
    let simple = if is("PING") {
        Some(Op::Ping)
    } else if is("PONG") {
        Some(Op::Pong)
    } else if is("+OK") || is("INFO") {
        Some(Op::Other)
    } else if is("-ERR") {
        Some(Op::Err(line.to_owned()))
    } else if is("MSG") || is("HMSG") {
        None
    } else {
        return Err(format!("unknown operation {line:?}"));
    };
    if let Some(simple) = simple {
        buf.advance(end + 2);
        return Ok(Some(simple));
    }
    let malformed = || format!("a malformed {op} line {line:?}");
    // MSG <subject> <sid> [reply-to] <#bytes>
    // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
    let with_headers = is("HMSG");
    let sizes = if with_headers { 2 } else { 1 };
    let mut args = [""; 5];
    let mut count = 0;
    for word in words {
        *args.get_mut(count).ok_or_else(malformed)? = word;
        count += 1;
    }
    if count != 2 + sizes && count != 3 + sizes {
        return Err(malformed());
    }
    let number = |s: &str| s.parse::<usize>().map_err(|_| malformed());
    let subject = args[0].to_owned();
    let sid = number(args[1])? as u64;
    let reply = (count == 3 + sizes).then(|| args[2].to_owned());
    let total = number(args[count - 1])?;
    let header_len = if with_headers {
        number(args[count - 2])?
    } else {
        0
    };
    if header_len > total {
        return Err(malformed());
    }
    if buf.len() < end + 2 + total + 2 {
        buf.reserve(end + 2 + total + 2 - buf.len());
        return Ok(None);
    }
    buf.advance(end + 2);
    let headers = if with_headers {
        let block = buf.split_to(header_len);
        Some(parse_headers(&block)?)
    } else {
        None
    };
    // Copied out rather than split off: a split payload would share the read buffer's
    // 64-KiB block, so every read would need a new block while events of the last one wait
    // in sockets' queues, and a socket slow to take its events would keep whole blocks
    // alive. The copy is a payload-sized allocation; the buffer stays one block, reused.
    let payload = Bytes::copy_from_slice(&buf[..total - header_len]);
    buf.advance(total - header_len);
    if &buf[..2] != b"\r\n" {
        return Err("a message not followed by CRLF".into());
    }
    buf.advance(2);
    let message = Message {
        subject: subject.into(),
        reply: reply.map(Into::into),
        payload,
        headers,
        status: None,
        description: None,
        length: total,
    };
    Ok(Some(Op::Msg { sid, message }))
}

/// A header block: `NATS/1.0[ status]`, then `Name: value` lines, then an empty line.
fn parse_headers(block: &[u8]) -> Result<HeaderMap, String> {
    let text = std::str::from_utf8(block).map_err(|_| "a header block not UTF-8")?;
    let mut lines = text.split("\r\n");
    if !lines.next().unwrap_or("").starts_with("NATS/1.0") {
        return Err("a header block without its NATS/1.0 line".into());
    }
    let mut headers = HeaderMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let Ok(name) = HeaderName::from_str(name.trim()) {
            headers.append(name, value.trim());
        }
    }
    Ok(headers)
}

/// What a `PING` in flight stands for when its `PONG` comes.
#[derive(Default)]
struct Ping {
    /// Subscribers told their subscription is in effect.
    in_effect: Vec<oneshot::Sender<()>>,
    /// The subscriptions sent again after a reconnect are in effect: count it.
    reconnect: bool,
}

/// Why a connection ended.
enum Ended {
    Stopping,
    Lost(String),
}

/// A subscription as the connection keeps it.
struct Sub {
    subject: String,
    queue: flume::Sender<Message>,
}

/// The connection: one task reads and dispatches, takes subscribe and unsubscribe commands,
/// and writes what they and the server's `PING`s need.
pub(crate) struct Link {
    servers: Vec<Server>,
    name: String,
    /// The connection [`UserEvents::connect`] made, until `run` takes it.
    first: Option<Open>,
    commands: mpsc::UnboundedReceiver<Command>,
    subs: HashMap<u64, Sub>,
    /// Subscribers whose `SUB` is written, for the next `PING` to confirm.
    asked: Vec<oneshot::Sender<()>>,
    /// The `PING`s in flight, oldest first.
    pings: VecDeque<Ping>,
    unanswered: u32,
    reconnects: watch::Sender<u64>,
    connected: watch::Sender<bool>,
}

impl Link {
    /// Serves the connection, connecting again whenever it is lost, until `cancel` fires.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut again = false;
        loop {
            let open = match self.first.take() {
                Some(open) => open,
                None => match self.reconnect(&cancel).await {
                    Some(open) => open,
                    None => return,
                },
            };
            self.connected.send_replace(true);
            match self.serve(open, again, &cancel).await {
                Ended::Stopping => return,
                Ended::Lost(reason) => {
                    tracing::warn!(%reason, "lost NATS (users' events); connecting again");
                    self.connected.send_replace(false);
                    // Their subscriptions are sent again on the next connection; its PING
                    // confirms them.
                    for ping in self.pings.drain(..) {
                        self.asked.extend(ping.in_effect);
                    }
                    self.unanswered = 0;
                    again = true;
                }
            }
        }
    }

    /// Tries every server in turn, at once and then every [`RECONNECT_WAIT`], taking
    /// commands meanwhile; `None` when the gateway stops first.
    async fn reconnect(&mut self, cancel: &CancellationToken) -> Option<Open> {
        let mut wait = Duration::ZERO;
        let mut rounds: u32 = 0;
        loop {
            let pause = tokio::time::sleep(wait);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = &mut pause => break,
                    command = self.commands.recv() => match command {
                        Some(command) => self.command(command, None),
                        None => return None,
                    },
                }
            }
            wait = RECONNECT_WAIT;
            // Why it fails (refused, a TLS or login error) once now and then, not every 250 ms.
            let say = rounds.is_multiple_of(WARN_EVERY_ROUNDS);
            rounds = rounds.wrapping_add(1);
            tokio::select! {
                () = cancel.cancelled() => return None,
                reached = reach(&self.servers, &self.name) => match reached {
                    Ok((open, server)) => {
                        tracing::info!(host = %server.host, port = server.port, "NATS is back (users' events)");
                        return Some(open);
                    }
                    Err(reason) if say => tracing::warn!(%reason, "NATS not back yet (users' events)"),
                    Err(reason) => tracing::debug!(%reason, "NATS not back yet (users' events)"),
                },
            }
        }
    }

    async fn serve(
        &mut self,
        (io, mut buf): Open,
        again: bool,
        cancel: &CancellationToken,
    ) -> Ended {
        let (mut read, mut write) = tokio::io::split(io);
        let mut out = BytesMut::new();
        if again {
            for (sid, sub) in &self.subs {
                write_sub(&mut out, *sid, &sub.subject);
            }
            out.extend_from_slice(b"PING\r\n");
            self.pings.push_back(Ping {
                in_effect: std::mem::take(&mut self.asked),
                reconnect: true,
            });
        }
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        // What arrived with the greeting.
        if let Err(reason) = self.take_ops(&mut buf, &mut out) {
            return Ended::Lost(reason);
        }
        loop {
            if !self.asked.is_empty() {
                out.extend_from_slice(b"PING\r\n");
                self.pings.push_back(Ping {
                    in_effect: std::mem::take(&mut self.asked),
                    reconnect: false,
                });
            }
            if let Err(reason) = flush(&mut write, &mut out).await {
                return Ended::Lost(reason);
            }
            buf.reserve(READ_CHUNK);
            tokio::select! {
                () = cancel.cancelled() => return Ended::Stopping,
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ended::Stopping };
                    self.command(command, Some(&mut out));
                    // Everything asked meanwhile goes out together, confirmed by one PING.
                    while let Ok(command) = self.commands.try_recv() {
                        self.command(command, Some(&mut out));
                    }
                }
                read = read.read_buf(&mut buf) => match read {
                    Ok(0) => return Ended::Lost("the server closed the connection".into()),
                    Err(e) => return Ended::Lost(e.to_string()),
                    Ok(_) => if let Err(reason) = self.take_ops(&mut buf, &mut out) {
                        return Ended::Lost(reason);
                    },
                },
                _ = ping.tick() => {
                    if self.unanswered >= PINGS_UNANSWERED {
                        return Ended::Lost(format!("{} PINGs unanswered", self.unanswered));
                    }
                    self.unanswered += 1;
                    out.extend_from_slice(b"PING\r\n");
                    self.pings.push_back(Ping::default());
                }
            }
        }
    }

    /// A subscribe or unsubscribe; `out` is where its line goes, `None` while disconnected
    /// (a subscription is sent with all the others on the next connection).
    fn command(&mut self, command: Command, out: Option<&mut BytesMut>) {
        match command {
            Command::Subscribe {
                sid,
                subject,
                queue,
                in_effect,
            } => {
                if let Some(out) = out {
                    write_sub(out, sid, &subject);
                }
                self.subs.insert(sid, Sub { subject, queue });
                self.asked.push(in_effect);
            }
            Command::Unsubscribe(sid) => {
                if self.subs.remove(&sid).is_some()
                    && let Some(out) = out
                {
                    write_unsub(out, sid);
                }
            }
        }
        meters::event_subscriptions(self.subs.len());
    }

    /// Handles every whole operation in `buf`.
    fn take_ops(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<(), String> {
        while let Some(op) = next_op(buf)? {
            match op {
                Op::Msg { sid, message } => self.dispatch(sid, message, out),
                Op::Ping => out.extend_from_slice(b"PONG\r\n"),
                Op::Pong => {
                    self.unanswered = 0;
                    if let Some(ping) = self.pings.pop_front() {
                        for subscriber in ping.in_effect {
                            let _ = subscriber.send(());
                        }
                        if ping.reconnect {
                            tracing::info!("users' events subscribed again; sockets catch up");
                            self.reconnects.send_modify(|n| *n += 1);
                        }
                    }
                }
                Op::Other => {}
                Op::Err(line) => tracing::warn!(%line, "NATS error (users' events)"),
            }
        }
        Ok(())
    }

    /// Hands a message to its subscription's queue. A full queue ends the subscription: its
    /// socket reconnects and replays its backlog rather than miss an event unseen.
    fn dispatch(&mut self, sid: u64, message: Message, out: &mut BytesMut) {
        let Some(sub) = self.subs.get(&sid) else {
            // Unsubscribed while the message was on its way.
            return;
        };
        match sub.queue.try_send(message) {
            Ok(()) => return,
            Err(flume::TrySendError::Full(_)) => {
                tracing::warn!(subject = %sub.subject, "a socket is not taking its events; ending its subscription");
                meters::event_overflow();
            }
            // The socket is gone; its unsubscribe is on the way.
            Err(flume::TrySendError::Disconnected(_)) => {}
        }
        self.subs.remove(&sid);
        write_unsub(out, sid);
        meters::event_subscriptions(self.subs.len());
    }
}

fn write_sub(out: &mut BytesMut, sid: u64, subject: &str) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

fn write_unsub(out: &mut BytesMut, sid: u64) {
    out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes());
}

async fn flush(write: &mut (impl AsyncWrite + Unpin), out: &mut BytesMut) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    write.write_all(out).await.map_err(|e| e.to_string())?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every whole operation in `buf`, taken off it.
    fn take_all(buf: &mut BytesMut) -> Vec<Op> {
        let mut ops = Vec::new();
        while let Some(op) = next_op(buf).expect("valid protocol") {
            ops.push(op);
        }
        ops
    }

    fn ops(bytes: &[u8]) -> Vec<Op> {
        let mut buf = BytesMut::from(bytes);
        let ops = take_all(&mut buf);
        assert!(buf.is_empty(), "everything taken: {buf:?}");
        ops
    }

    /// The payloads of `ops`, which are all messages.
    fn payloads(ops: &[Op]) -> Vec<&[u8]> {
        ops.iter()
            .map(|op| match op {
                Op::Msg { message, .. } => &message.payload[..],
                other => panic!("only messages: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn messages_with_and_without_headers_and_reply_are_read() {
        let wire = b"MSG chat.user.7 3 5\r\nhello\r\n\
            HMSG chat.user.7 3 _INBOX.x 32 36\r\nNATS/1.0\r\ntraceparent: 00-ab\r\n\r\nbody\r\n\
            PING\r\nPONG\r\n+OK\r\n";
        let ops = ops(wire);
        assert_eq!(ops.len(), 5, "{ops:?}");
        let Op::Msg { sid, message } = &ops[0] else {
            panic!("a message first: {ops:?}")
        };
        assert_eq!((*sid, message.subject.as_str()), (3, "chat.user.7"));
        assert_eq!(&message.payload[..], b"hello");
        assert!(message.headers.is_none() && message.reply.is_none());
        let Op::Msg { message, .. } = &ops[1] else {
            panic!("a message second: {ops:?}")
        };
        assert_eq!(&message.payload[..], b"body");
        assert_eq!(message.reply.as_deref(), Some("_INBOX.x"));
        let headers = message.headers.as_ref().expect("headers");
        assert_eq!(
            headers.get("traceparent").map(|v| v.as_str()),
            Some("00-ab")
        );
        assert!(matches!(ops[2], Op::Ping));
        assert!(matches!(ops[3], Op::Pong));
        assert!(matches!(ops[4], Op::Other));
    }

    #[test]
    fn events_waiting_in_sockets_do_not_hold_the_read_buffer() {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(
            b"HMSG s.1 9 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nxy\r\nMSG s.2 4 2\r\nhi\r\n",
        );
        let held = take_all(&mut buf);
        // Both events are still waiting to be written, and the next read goes into the same
        // block: a payload sharing it would make the buffer allocate a new one.
        assert!(
            buf.try_reclaim(READ_CHUNK),
            "the read buffer is free to reuse"
        );
        assert_eq!(payloads(&held), [&b"xy"[..], &b"hi"[..]]);
    }

    #[test]
    fn a_message_split_anywhere_is_read_once_whole() {
        let wire: &[u8] =
            b"HMSG s.1 9 18 22\r\nNATS/1.0\r\nA: b\r\n\r\n\r\nxy\r\nMSG s.2 4 2\r\n\r\n\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = take_all(&mut buf);
            buf.extend_from_slice(&wire[cut..]);
            got.extend(take_all(&mut buf));
            // Payloads may hold CRLF: only the sizes say where a message ends.
            assert_eq!(
                payloads(&got),
                [&b"\r\nxy"[..], &b"\r\n"[..]],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_guess() {
        for wire in [
            &b"BOGUS\r\n"[..],
            b"MSG s 1\r\n",
            b"MSG s x 3\r\nabc\r\n",
            b"MSG s 1 3\r\nabcd\r\n",
            b"HMSG s 1 9 3\r\nabc\r\n",
        ] {
            let mut buf = BytesMut::from(wire);
            assert!(
                next_op(&mut buf).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut long = BytesMut::from(&vec![b'x'; MAX_LINE + 1][..]);
        assert!(next_op(&mut long).is_err());
    }

    #[test]
    fn urls_are_read_as_async_nats_reads_them() {
        let list =
            servers("nats://127.0.0.1:4222, tls://u:p@nats:4223,tok@other,[::1]:4224").unwrap();
        let server = |host: &str, port, auth, tls| Server {
            host: host.into(),
            port,
            auth,
            tls,
        };
        assert_eq!(
            list,
            vec![
                server("127.0.0.1", 4222, Auth::None, false),
                server(
                    "nats",
                    4223,
                    Auth::User {
                        user: "u".into(),
                        pass: "p".into()
                    },
                    true
                ),
                server("other", 4222, Auth::Token("tok".into()), false),
                server("::1", 4224, Auth::None, false),
            ]
        );
        let refused = servers("ws://u:secret@127.0.0.1:4222").unwrap_err();
        assert!(!refused.contains("secret"), "{refused}");
        assert!(servers("").is_err());
    }
}
