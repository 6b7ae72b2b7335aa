//! The chat's public contract as a client sees it (PROTOCOL.md): accounts over HTTP, sessions
//! over WebSocket. Nothing here knows how the server is built, so the same driver loads the
//! whole stack and the bare relay alike; with [`Protocol::Xmpp`] the same calls speak XMPP
//! over WebSocket ([`crate::xmpp`]) to load ejabberd.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use url::Url;

use crate::xmpp;

/// Attempts at an XMPP session whose stream the server closed before it opened
/// ([`xmpp::NotOpened`]), before the connection counts as failed.
const XMPP_OPEN_TRIES: u32 = 3;

/// How long an account call is retried while the server is not ready, and how often.
const NOT_READY_WAIT: Duration = Duration::from_secs(10);
const NOT_READY_RETRY: Duration = Duration::from_millis(100);

/// What the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// This chat's contract (PROTOCOL.md): the stack, or the bare relay. `--base` is the HTTP
    /// base URL.
    Chat,
    /// XMPP over WebSocket (RFC 7395), e.g. ejabberd. `--base` is the WebSocket URL; accounts
    /// are made through ejabberd's HTTP API (`/api/register`) on the same host and port.
    Xmpp,
}

/// Whom a message goes to or came from, as the protocol names users.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Peer {
    Id(i64),
    Jid(String),
}

/// A user the tool registered, with a token to connect as it (the chat), or its JID (XMPP).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub username: String,
    pub password: String,
    pub user_id: i64,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jid: Option<String>,
}

impl Account {
    /// The address messages to this user are sent to.
    pub fn peer(&self) -> Peer {
        match &self.jid {
            Some(jid) => Peer::Jid(jid.clone()),
            None => Peer::Id(self.user_id),
        }
    }
}

/// The HTTP side of one server.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: Url,
    protocol: Protocol,
}

impl Api {
    pub fn new(base: &str, protocol: Protocol) -> Result<Api> {
        let base = Url::parse(base).with_context(|| format!("--base {base:?} is not a URL"))?;
        Ok(Api {
            http: reqwest::Client::new(),
            base,
            protocol,
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// `ws://host:port/ws` for an `http://host:port` base; an XMPP base is the WebSocket's.
    pub fn ws_url(&self) -> Url {
        if self.protocol == Protocol::Xmpp {
            return self.base.clone();
        }
        let mut url = self.base.join("/ws").expect("/ws is a valid path");
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        url.set_scheme(scheme)
            .expect("ws and wss are valid schemes");
        url
    }

    /// The address the server listens on (to find its process).
    pub fn server_port(&self) -> Option<u16> {
        self.base.port_or_known_default()
    }

    /// Registers `username` (or finds it taken, from an earlier run) and logs in. An XMPP
    /// account is only registered: a session logs in with SASL.
    pub async fn register_and_login(&self, username: &str, password: &str) -> Result<Account> {
        if self.protocol == Protocol::Xmpp {
            self.register_xmpp(username, password).await?;
            return Ok(Account {
                username: username.to_owned(),
                password: password.to_owned(),
                user_id: 0,
                token: String::new(),
                jid: Some(format!("{username}@{}", xmpp::DOMAIN)),
            });
        }
        let body = json!({"username": username, "password": password});
        let response = self.post("/api/v1/register", &body).await?;
        let status = response.status();
        if status.as_u16() != 201 && status.as_u16() != 409 {
            bail!("register {username}: {status} {}", response.text().await?);
        }
        let response = self.post("/api/v1/login", &body).await?;
        let status = response.status();
        if !status.is_success() {
            bail!("login {username}: {status} {}", response.text().await?);
        }
        #[derive(Deserialize)]
        struct Login {
            token: String,
            user_id: i64,
        }
        let login: Login = response.json().await?;
        Ok(Account {
            username: username.to_owned(),
            password: password.to_owned(),
            user_id: login.user_id,
            token: login.token,
            jid: None,
        })
    }

    /// Registers through ejabberd's `mod_http_api`; `Ok(false)` when the user already exists.
    async fn register_xmpp(&self, username: &str, password: &str) -> Result<bool> {
        let mut url = self.base.join("/api/register")?;
        url.set_scheme(if self.base.scheme() == "wss" {
            "https"
        } else {
            "http"
        })
        .expect("http and https are valid schemes");
        let body = json!({"user": username, "host": xmpp::DOMAIN, "password": password});
        let response = self.http.post(url).json(&body).send().await?;
        let status = response.status();
        let text = response.text().await?;
        if status.is_success() {
            return Ok(true);
        }
        // ejabberd's code for "already registered".
        if text.contains("10090") {
            return Ok(false);
        }
        bail!("register {username}: {status} {text}")
    }

    /// Whether `account` can still connect: its token is accepted (the chat), or it still
    /// exists (XMPP: registering it again is refused).
    async fn still_valid(&self, account: &Account) -> Result<bool> {
        match self.protocol {
            Protocol::Chat => self.token_works(&account.token).await,
            Protocol::Xmpp => Ok(!self
                .register_xmpp(&account.username, &account.password)
                .await?),
        }
    }

    /// Opens a session of `account` (see [`Session::connect`]).
    pub async fn connect(&self, account: &Account, source: Option<IpAddr>) -> Result<Session> {
        let url = self.ws_url();
        match self.protocol {
            Protocol::Chat => Session::connect(&url, &account.token, source).await,
            Protocol::Xmpp => {
                let resource = format!("bench-{}", run_tag());
                let mut tries = 1;
                loop {
                    let ws = dial(&url, source, None, Some(xmpp::SUBPROTOCOL)).await?;
                    match xmpp::start(ws, &account.username, &account.password, &resource).await {
                        Ok((writer, reader)) => {
                            return Ok(Session(Conn::Xmpp(writer, Box::new(reader))));
                        }
                        // Said on stderr each time: a comparison should show it.
                        Err(e) if e.is::<xmpp::NotOpened>() && tries < XMPP_OPEN_TRIES => {
                            eprintln!("chat-bench: {}: {e}; connecting again", account.username);
                            tries += 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// POSTs `body`, again while the server answers `503 not_ready` (its store not answering
    /// yet, as just after the stack started; PROTOCOL.md: retry), for up to [`NOT_READY_WAIT`].
    async fn post(&self, path: &str, body: &serde_json::Value) -> Result<reqwest::Response> {
        static TOLD: std::sync::Once = std::sync::Once::new();
        let url = self.base.join(path)?;
        let give_up = tokio::time::Instant::now() + NOT_READY_WAIT;
        loop {
            let response = self.http.post(url.clone()).json(body).send().await?;
            if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE
                || tokio::time::Instant::now() >= give_up
            {
                return Ok(response);
            }
            TOLD.call_once(|| {
                eprintln!(
                    "chat-bench: {} is not ready (503); retrying for up to {NOT_READY_WAIT:?}",
                    self.base
                );
            });
            tokio::time::sleep(NOT_READY_RETRY).await;
        }
    }

    /// Whether `token` is still accepted.
    pub async fn token_works(&self, token: &str) -> Result<bool> {
        let response = self
            .http
            .get(self.base.join("/api/v1/me")?)
            .bearer_auth(token)
            .send()
            .await?;
        Ok(response.status().is_success())
    }

    /// The newest message stored between the token's user and `peer` (the history API).
    pub async fn newest_message(&self, token: &str, peer: i64) -> Result<Option<String>> {
        let url = self
            .base
            .join(&format!("/api/v1/conversations/{peer}/messages?limit=1"))?;
        let response = self.http.get(url).bearer_auth(token).send().await?;
        if !response.status().is_success() {
            bail!("history: {}", response.status());
        }
        let page: serde_json::Value = response.json().await?;
        Ok(page["messages"][0]["msg_id"].as_str().map(str::to_owned))
    }

    /// `n` accounts: fresh ones, or those kept in `cache` from an earlier run against the same
    /// server while their tokens still work (registering costs the server an argon2 hash and
    /// logging in another, tens of milliseconds each, so thousands take minutes).
    pub async fn accounts(&self, n: usize, cache: Option<&Path>) -> Result<Vec<Account>> {
        #[derive(Serialize, Deserialize)]
        struct Cache {
            base: String,
            accounts: Vec<Account>,
        }
        let mut have = Vec::new();
        if let Some(path) = cache
            && let Ok(text) = std::fs::read_to_string(path)
            && !text.trim().is_empty()
        {
            let cached: Cache = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an accounts file", path.display()))?;
            let usable = cached.base == self.base.as_str()
                && match (cached.accounts.first(), cached.accounts.last()) {
                    (Some(first), Some(last)) => {
                        self.still_valid(first).await? && self.still_valid(last).await?
                    }
                    _ => false,
                };
            if usable {
                have = cached.accounts;
            }
        }
        if have.len() < n {
            let made = self.register_many(n - have.len()).await?;
            have.extend(made);
            if let Some(path) = cache {
                let text = serde_json::to_string(&Cache {
                    base: self.base.to_string(),
                    accounts: have.clone(),
                })?;
                std::fs::write(path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        have.truncate(n);
        Ok(have)
    }

    async fn register_many(&self, n: usize) -> Result<Vec<Account>> {
        let run = run_tag();
        let bar = crate::report::bar(n as u64, "accounts");
        let accounts = futures::stream::iter(0..n)
            .map(|i| {
                let (api, bar, run) = (self.clone(), bar.clone(), run.clone());
                async move {
                    let account = api
                        .register_and_login(&format!("b{run}_{i}"), "bench-password-1")
                        .await?;
                    bar.inc(1);
                    anyhow::Ok(account)
                }
            })
            .buffered(PROVISIONING_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        bar.finish_and_clear();
        Ok(accounts)
    }
}

/// Six random letters naming this run, so its usernames and `client_id`s are new to a server
/// that has seen earlier runs (a reused `client_id` is a retry, answered with the old message).
pub fn run_tag() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// Registrations in flight at once: enough to keep the server's hashing threads busy.
const PROVISIONING_CONCURRENCY: usize = 16;

/// A frame from the server, as far as the tool cares.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Hello,
    Sent {
        client_id: String,
        msg_id: String,
    },
    Message {
        msg_id: String,
        from: Peer,
        body: String,
    },
    BacklogDone {
        count: u64,
    },
    Receipt {
        msg_id: String,
        status: String,
    },
    Error {
        code: String,
        client_id: Option<String>,
    },
    #[serde(other)]
    Other,
}

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// One WebSocket session of an account.
pub struct Session(Conn);

enum Conn {
    Chat(Box<Ws>),
    Xmpp(xmpp::Writer, Box<xmpp::Reader>),
}

/// Small buffers: the tool holds thousands of idle sessions at once, and writes each frame
/// as it sends it.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

impl Session {
    /// Opens a chat session with `token` and waits for `hello`. `source` picks the local
    /// address (loopback has all of 127.0.0.0/8), so many sessions do not run out of ports of
    /// one address.
    async fn connect(url: &Url, token: &str, source: Option<IpAddr>) -> Result<Session> {
        let ws = dial(url, source, Some(token), None).await?;
        let mut session = Session(Conn::Chat(Box::new(ws)));
        match session.next().await? {
            Some(Event::Hello) => Ok(session),
            other => Err(anyhow!("the first frame is not hello but {other:?}")),
        }
    }

    /// Reads until `backlog_done` (the end of the session's start: presence announced,
    /// backlog replayed) and returns its count.
    pub async fn until_backlog_done(&mut self) -> Result<u64> {
        loop {
            match self.next().await? {
                Some(Event::BacklogDone { count }) => return Ok(count),
                Some(_) => {}
                None => bail!("the server closed the session before backlog_done"),
            }
        }
    }

    /// The next frame the tool understands (`None` when the server closed the socket).
    pub async fn next(&mut self) -> Result<Option<Event>> {
        match &mut self.0 {
            Conn::Chat(ws) => next_event(ws.as_mut()).await,
            Conn::Xmpp(_, reader) => reader.next().await,
        }
    }

    /// Reads events until the stream ends (an idle session's life: reading answers the
    /// server's pings, and XMPP's ack requests).
    pub async fn idle(mut self) {
        while let Ok(Some(_)) = self.next().await {}
    }

    pub fn split(self) -> (Writer, Reader) {
        match self.0 {
            Conn::Chat(ws) => {
                let (sink, stream) = (*ws).split();
                (Writer::Chat(sink), Reader::Chat(stream))
            }
            Conn::Xmpp(writer, reader) => (Writer::Xmpp(writer), Reader::Xmpp(reader)),
        }
    }
}

/// A WebSocket to `url` from `source`, with a bearer `token` or asking for `subprotocol`.
async fn dial(
    url: &Url,
    source: Option<IpAddr>,
    token: Option<&str>,
    subprotocol: Option<&str>,
) -> Result<Ws> {
    let host = url.host_str().context("a ws URL has a host")?;
    let port = url.port_or_known_default().context("a ws URL has a port")?;
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut request = url.as_str().into_client_request()?;
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse()?);
    }
    if let Some(subprotocol) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", subprotocol.parse()?);
    }
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await?;
    Ok(ws)
}

async fn next_event<S>(stream: &mut S) -> Result<Option<Event>>
where
    S: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(frame) = stream.next().await {
        match frame? {
            WsMessage::Text(text) => {
                return Ok(Some(serde_json::from_str(&text).with_context(|| {
                    format!("a frame the contract does not allow: {text}")
                })?));
            }
            WsMessage::Close(_) => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

/// The sending half of a session.
pub enum Writer {
    Chat(SplitSink<Ws, WsMessage>),
    Xmpp(xmpp::Writer),
}

impl Writer {
    pub async fn send(&mut self, to: &Peer, client_id: &str, body: &str) -> Result<()> {
        match (self, to) {
            (Writer::Chat(sink), Peer::Id(to)) => {
                let frame = json!({"type": "send", "to": to, "client_id": client_id, "body": body});
                sink.send(WsMessage::text(frame.to_string())).await?;
                Ok(())
            }
            (Writer::Xmpp(writer), Peer::Jid(to)) => writer.send(to, client_id, body).await,
            (_, to) => bail!("{to:?} is not an address of this session's protocol"),
        }
    }

    /// Tells the server this device has these messages (as every real client does). An XMPP
    /// client acks when the server asks, which its reading half does: nothing to send here.
    pub async fn ack(&mut self, msg_ids: &[String]) -> Result<()> {
        match self {
            Writer::Chat(sink) => {
                let frame = json!({"type": "ack", "msg_ids": msg_ids});
                sink.send(WsMessage::text(frame.to_string())).await?;
                Ok(())
            }
            Writer::Xmpp(_) => Ok(()),
        }
    }

    pub async fn close(self) {
        match self {
            Writer::Chat(mut sink) => {
                let _ = sink.close().await;
            }
            Writer::Xmpp(writer) => writer.close().await,
        }
    }
}

/// The receiving half of a session.
pub enum Reader {
    Chat(SplitStream<Ws>),
    Xmpp(Box<xmpp::Reader>),
}

impl Reader {
    pub async fn next(&mut self) -> Result<Option<Event>> {
        match self {
            Reader::Chat(stream) => next_event(stream).await,
            Reader::Xmpp(reader) => reader.next().await,
        }
    }
}

/// Most acks one frame may carry (PROTOCOL.md).
pub const MAX_ACK_IDS: usize = 500;
