//! The end-to-end test harness.
//!
//! [`TestEnv::start`] gives a test its own namespace (so its own NATS subjects, streams and
//! Redis keys) and its own MariaDB database, runs gateways, routers and stores in-process on
//! the real local NATS, Redis and MariaDB, and removes everything again in
//! [`TestEnv::finish`] (or, if the test panicked, when the env is dropped). [`Client`] is a
//! real WebSocket client with typed helpers that wait with a deadline, never a sleep.
//!
//! Set `TEST_LOG=1` to see the services' logs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chat_proto::Subjects;
use chat_runtime::CommonConfig;
use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub mod link;
pub mod procs;
pub mod servers;
pub mod traffic;

use procs::Proc;

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

/// How long a test waits for something that should happen before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

static TELEMETRY: OnceLock<chat_runtime::telemetry::TelemetryGuard> = OnceLock::new();

/// Trace context for every test (the services put `traceparent` on NATS headers); logs only
/// with `TEST_LOG=1`.
fn init_logging() {
    TELEMETRY.get_or_init(|| {
        chat_runtime::telemetry::install("chat-tests", std::env::var_os("TEST_LOG").is_some())
    });
}

/// What a test may change about the services it starts.
#[derive(Debug, Clone)]
pub struct Options {
    pub gateways: usize,
    pub routers: usize,
    pub stores: usize,
    pub presence_ttl: Duration,
    pub send_rate: u32,
    pub send_burst: u32,
    pub auth_rate_ip: u32,
    pub login_rate_user: u32,
    /// How long router and store leave a message unacked before JetStream redelivers it.
    pub ack_wait: Duration,
    /// Frames queued per socket before a non-reading client is dropped.
    pub outbound_queue: usize,
    /// How long the store lets a batch gather (`CHAT_STORE_LINGER`); its default when `None`.
    pub store_linger: Option<Duration>,
    /// NATS and Redis to use instead of the machine's (a test's private servers).
    pub nats_url: Option<String>,
    /// A CA certificate (PEM) that NATS's TLS certificate is signed with: the services run as
    /// processes trust it through `SSL_CERT_FILE`, and the test's own connections too.
    pub nats_ca: Option<std::path::PathBuf>,
    pub redis_url: Option<String>,
    /// MariaDB server (`mysql://user@host:port`) instead of the machine's.
    pub mysql_server: Option<String>,
    /// More environment for services run as processes (`OTEL_*`, say).
    pub process_env: Vec<(String, String)>,
    /// Run the services as real processes (which a test can kill) instead of in-process.
    pub processes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gateways: 1,
            routers: 1,
            stores: 1,
            presence_ttl: Duration::from_secs(20),
            send_rate: 1000,
            send_burst: 2000,
            auth_rate_ip: 600,
            login_rate_user: 10,
            ack_wait: Duration::from_secs(30),
            outbound_queue: 4096,
            store_linger: None,
            nats_url: None,
            nats_ca: None,
            redis_url: None,
            mysql_server: None,
            process_env: Vec::new(),
            processes: false,
        }
    }
}

/// A running service: a task in this process, or a child process.
enum Service {
    Task {
        cancel: CancellationToken,
        /// Its error, if one of its tasks ended before it was stopped.
        task: JoinHandle<Result<(), String>>,
    },
    Process(Box<Proc>),
    /// Taken out by the test (`take_gateway`).
    Stopped,
}

impl Service {
    /// Stops it as SIGTERM would and waits for it.
    async fn stop(&mut self) {
        match self {
            Service::Task { cancel, task } => {
                cancel.cancel();
                if let Ok(Err(e)) = task.await {
                    panic!("a service failed while the test ran: {e}");
                }
            }
            Service::Process(p) => {
                let _ = p.terminate(Duration::from_secs(15)).await;
            }
            Service::Stopped => {}
        }
    }

    fn abort(&mut self) {
        match self {
            Service::Task { cancel, task } => {
                cancel.cancel();
                task.abort();
            }
            Service::Process(p) => p.kill_now(),
            Service::Stopped => {}
        }
    }

    fn into_process(self) -> Proc {
        match self {
            Service::Process(p) => *p,
            Service::Task { .. } | Service::Stopped => {
                panic!("only services started with `processes: true` can be killed")
            }
        }
    }
}

/// One test's private deployment.
pub struct TestEnv {
    pub subjects: Subjects,
    pub database: String,
    pub options: Options,
    pub jwt_secret: String,
    gateways: Vec<(SocketAddr, Service)>,
    routers: Vec<Service>,
    stores: Vec<Service>,
    /// The operations port (`/readyz`, `/metrics`) of each store started, in start order.
    store_ops: Vec<SocketAddr>,
    router_ops: Vec<SocketAddr>,
    http: reqwest::Client,
    cleaned: bool,
}

/// A registered user with a token.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub token: String,
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A namespace no other test uses.
fn fresh_subjects() -> Subjects {
    Subjects::new(&format!("t{}", random_suffix())).expect("a valid namespace")
}

/// Runs `test` in a namespace no other test uses, for a test that makes its streams without
/// a deployment, and deletes the namespace's streams after it, passed or panicked.
pub async fn in_fresh_namespace<F, Fut>(test: F)
where
    F: FnOnce(async_nats::jetstream::Context, Subjects) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let subjects = fresh_subjects();
    let nats = async_nats::connect(NATS_URL).await.expect("NATS answers");
    let js = async_nats::jetstream::new(nats);
    let outcome = std::panic::AssertUnwindSafe(test(js.clone(), subjects.clone()))
        .catch_unwind()
        .await;
    delete_streams(&js, &subjects).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Deletes the namespace's two streams, whichever exist.
pub async fn delete_streams(js: &async_nats::jetstream::Context, subjects: &Subjects) {
    for stream in [subjects.in_stream(), subjects.store_stream()] {
        let _ = js.delete_stream(&stream).await;
    }
}

impl TestEnv {
    /// One gateway, one router, one store.
    pub async fn start_default() -> TestEnv {
        TestEnv::start(Options::default()).await
    }

    pub async fn start(options: Options) -> TestEnv {
        init_logging();
        let suffix = random_suffix();
        let subjects = Subjects::new(&format!("t{suffix}")).expect("a valid namespace");
        let mut env = TestEnv {
            subjects,
            database: format!("chat_t{suffix}"),
            options: options.clone(),
            jwt_secret: format!("test-secret-{suffix}"),
            gateways: Vec::new(),
            routers: Vec::new(),
            stores: Vec::new(),
            store_ops: Vec::new(),
            router_ops: Vec::new(),
            http: reqwest::Client::new(),
            cleaned: false,
        };
        // Stores first: they create the database, so routers and gateways find it migrated.
        for _ in 0..options.stores {
            env.start_store().await;
        }
        for _ in 0..options.routers {
            env.start_router().await;
        }
        for _ in 0..options.gateways {
            env.start_gateway().await;
        }
        env
    }

    fn urls(&self) -> Backends {
        Backends {
            nats: self.nats_url().to_owned(),
            nats_ca: self.options.nats_ca.clone(),
            redis: self.redis_url().to_owned(),
            mysql: self.mysql_server().to_owned(),
        }
    }

    fn common(&self) -> CommonConfig {
        CommonConfig::new(self.nats_url(), self.subjects.clone())
    }

    pub fn nats_url(&self) -> &str {
        self.options.nats_url.as_deref().unwrap_or(NATS_URL)
    }

    pub fn redis_url(&self) -> &str {
        self.options.redis_url.as_deref().unwrap_or(REDIS_URL)
    }

    pub fn mysql_server(&self) -> &str {
        self.options.mysql_server.as_deref().unwrap_or(MYSQL_SERVER)
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", self.mysql_server(), self.database)
    }

    /// `http://host:port` of the operations port of store `i` (in start order).
    pub fn store_ops_url(&self, i: usize) -> String {
        format!("http://{}", self.store_ops[i])
    }

    /// `http://host:port` of the operations port of router `i` (in start order).
    pub fn router_ops_url(&self, i: usize) -> String {
        format!("http://{}", self.router_ops[i])
    }

    pub fn gateway_config(&self) -> chat_gateway::Config {
        chat_gateway::Config {
            common: self.common(),
            http_addr: "127.0.0.1:0".into(),
            jwt_secret: self.jwt_secret.clone(),
            token_ttl: Duration::from_secs(3600),
            presence_ttl: self.options.presence_ttl,
            send_rate: self.options.send_rate,
            send_burst: self.options.send_burst,
            auth_rate_ip: self.options.auth_rate_ip,
            login_rate_user: self.options.login_rate_user,
            outbound_queue: self.options.outbound_queue,
        }
    }

    fn common_env(&self) -> Vec<(String, String)> {
        let mut env = self.options.process_env.clone();
        if let Some(ca) = &self.options.nats_ca {
            env.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
        }
        env.extend([
            ("NATS_URL".into(), self.nats_url().into()),
            ("CHAT_NAMESPACE".into(), self.subjects.namespace().into()),
            (
                "CHAT_ACK_WAIT".into(),
                format!("{}ms", self.options.ack_wait.as_millis()),
            ),
            (
                "CHAT_PRESENCE_TTL".into(),
                format!("{}ms", self.options.presence_ttl.as_millis()),
            ),
        ]);
        env
    }

    pub async fn start_store(&mut self) {
        let service = if self.options.processes {
            let ops = free_port();
            let mut env = self.common_env();
            env.push(("DATABASE_URL".into(), self.database_url()));
            env.push(("CHAT_OPS_ADDR".into(), ops.to_string()));
            if let Some(linger) = self.options.store_linger {
                env.push((
                    "CHAT_STORE_LINGER".into(),
                    format!("{}ms", linger.as_millis()),
                ));
            }
            self.store_ops.push(ops);
            Service::Process(Box::new(Proc::start("chat-store", env).await))
        } else {
            let config = chat_store::Config {
                common: self.common(),
                ops_addr: "127.0.0.1:0".into(),
                database_url: self.database_url(),
                migrate_only: false,
                ack_wait: self.options.ack_wait,
                batch_linger: self.options.store_linger.unwrap_or_else(|| {
                    chat_runtime::parse_duration(chat_store::DEFAULT_BATCH_LINGER)
                        .expect("the default is a duration")
                }),
            };
            let app = chat_store::App::build(config)
                .await
                .unwrap_or_else(|e| panic!("store does not start: {e}"));
            self.store_ops.push(app.ops_addr());
            spawn(|stop| app.run_until(stop))
        };
        self.stores.push(service);
    }

    pub async fn start_router(&mut self) {
        let service = if self.options.processes {
            let ops = free_port();
            let mut env = self.common_env();
            env.push(("REDIS_URL".into(), self.redis_url().into()));
            env.push(("CHAT_OPS_ADDR".into(), ops.to_string()));
            self.router_ops.push(ops);
            Service::Process(Box::new(Proc::start("chat-router", env).await))
        } else {
            let config = chat_router::Config {
                common: self.common(),
                ops_addr: "127.0.0.1:0".into(),
                redis_url: self.redis_url().into(),
                presence_ttl: self.options.presence_ttl,
                ack_wait: self.options.ack_wait,
            };
            let app = chat_router::App::build(config)
                .await
                .unwrap_or_else(|e| panic!("router does not start: {e}"));
            self.router_ops.push(app.ops_addr());
            spawn(|stop| app.run_until(stop))
        };
        self.routers.push(service);
    }

    /// Waits until the router's and the store's consumers have nothing pending and nothing
    /// unacked: whatever was sent has been routed, written and announced (or terminated).
    pub async fn consumers_done(&self) {
        let nats = connect_nats(self.nats_url(), self.options.nats_ca.as_deref())
            .await
            .expect("NATS answers");
        let js = async_nats::jetstream::new(nats);
        eventually("router and store consumers done", || async {
            for (stream, consumer) in [
                (self.subjects.in_stream(), self.subjects.router_consumer()),
                (self.subjects.store_stream(), self.subjects.store_consumer()),
            ] {
                let c = js
                    .get_stream(&stream)
                    .await
                    .ok()?
                    .consumer_info(consumer)
                    .await
                    .ok()?;
                if c.num_pending > 0 || c.num_ack_pending > 0 {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    /// Starts another gateway, in this process, that reaches NATS at `nats_url` (a
    /// [`link::Link`]'s, say) while the other services use the test's; returns its index.
    pub async fn start_gateway_via(&mut self, nats_url: &str) -> usize {
        let mut config = self.gateway_config();
        config.common.nats_url = nats_url.to_owned();
        let app = chat_gateway::App::build(config)
            .await
            .unwrap_or_else(|e| panic!("gateway does not start: {e}"));
        let addr = app.local_addr();
        self.gateways
            .push((addr, spawn(|stop| app.run_until(stop))));
        self.gateways.len() - 1
    }

    /// Starts another gateway; returns its index.
    pub async fn start_gateway(&mut self) -> usize {
        let (addr, service) = if self.options.processes {
            let addr = free_port();
            let c = self.gateway_config();
            let mut env = self.common_env();
            env.extend([
                ("CHAT_HTTP_ADDR".into(), addr.to_string()),
                ("CHAT_JWT_SECRET".into(), c.jwt_secret),
                ("CHAT_SEND_RATE".into(), c.send_rate.to_string()),
                ("CHAT_SEND_BURST".into(), c.send_burst.to_string()),
                ("CHAT_AUTH_RATE_IP".into(), c.auth_rate_ip.to_string()),
                ("CHAT_LOGIN_RATE_USER".into(), c.login_rate_user.to_string()),
                ("CHAT_OUTBOUND_QUEUE".into(), c.outbound_queue.to_string()),
            ]);
            (
                addr,
                Service::Process(Box::new(Proc::start("chat-gateway", env).await)),
            )
        } else {
            let app = chat_gateway::App::build(self.gateway_config())
                .await
                .unwrap_or_else(|e| panic!("gateway does not start: {e}"));
            (app.local_addr(), spawn(|stop| app.run_until(stop)))
        };
        self.gateways.push((addr, service));
        self.gateways.len() - 1
    }

    /// Takes router `i`'s process out (with `processes: true`), to kill and restart while
    /// the env is borrowed elsewhere; [`TestEnv::put_back`] returns it.
    pub fn take_router(&mut self, i: usize) -> Proc {
        self.routers.remove(i).into_process()
    }

    /// Takes store `i`'s process out, like [`TestEnv::take_router`].
    pub fn take_store(&mut self, i: usize) -> Proc {
        self.stores.remove(i).into_process()
    }

    /// Takes gateway `i`'s process out, like [`TestEnv::take_router`]; its address stays,
    /// so `ws_url(i)` still names it (and a restart listens there again).
    pub fn take_gateway(&mut self, i: usize) -> Proc {
        let (addr, service) = self.gateways.remove(i);
        self.gateways.insert(i, (addr, Service::Stopped));
        service.into_process()
    }

    /// Returns gateway `i`'s process (restarted or not) to its place.
    pub fn put_back_gateway(&mut self, i: usize, p: Proc) {
        self.gateways[i].1 = Service::Process(Box::new(p));
    }

    /// Returns a process taken out, so `finish` stops it.
    pub fn put_back(&mut self, p: Proc) {
        self.stores.push(Service::Process(Box::new(p)));
    }

    pub fn base_url(&self, gateway: usize) -> String {
        format!("http://{}", self.gateways[gateway].0)
    }

    pub fn ws_url(&self, gateway: usize) -> String {
        format!("ws://{}/ws", self.gateways[gateway].0)
    }

    /// An HTTP request to gateway 0, with a bearer token when given.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base_url(0)));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// GET as `user`; returns status and JSON body.
    pub async fn get(&self, user: &User, path: &str) -> (u16, Value) {
        let r = self
            .request(reqwest::Method::GET, path, Some(&user.token))
            .send()
            .await
            .expect("gateway answers HTTP");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON without a token; returns status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .request(reqwest::Method::POST, path, None)
            .json(body)
            .send()
            .await
            .expect("gateway answers HTTP");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Registers `name` (password "password-<name>") and logs in.
    pub async fn user(&self, name: &str) -> User {
        let password = format!("password-{name}");
        let creds = json!({ "username": name, "password": password });
        let (status, body) = self.post("/api/v1/register", &creds).await;
        assert_eq!(status, 201, "register {name}: {body}");
        let (status, body) = self.post("/api/v1/login", &creds).await;
        assert_eq!(status, 200, "login {name}: {body}");
        User {
            id: body["user_id"].as_i64().expect("user_id"),
            name: name.to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
        }
    }

    /// Opens a WebSocket for `user` on gateway 0 and waits for `hello`.
    pub async fn connect(&self, user: &User) -> Client {
        self.connect_to(user, 0).await
    }

    /// Alice and Bob, each with a device connected whose backlog has been read.
    pub async fn online_pair(&self) -> ((User, Client), (User, Client)) {
        let (a, b) = (self.user("alice").await, self.user("bob").await);
        let (mut ca, mut cb) = (self.connect(&a).await, self.connect(&b).await);
        ca.backlog().await;
        cb.backlog().await;
        ((a, ca), (b, cb))
    }

    pub async fn connect_to(&self, user: &User, gateway: usize) -> Client {
        Client::connect(&self.ws_url(gateway), user)
            .await
            .unwrap_or_else(|e| panic!("{} cannot connect: {e:#}", user.name))
    }

    /// Stops every service and removes the namespace's streams and keys and the database.
    pub async fn finish(mut self) {
        for (_, s) in &mut self.gateways {
            s.stop().await;
        }
        // Each drains its last pulls (up to 2 s): all at once.
        futures::future::join_all(
            self.routers
                .iter_mut()
                .chain(&mut self.stores)
                .map(Service::stop),
        )
        .await;
        if let Err(e) = cleanup(&self.urls(), &self.subjects, &self.database).await {
            panic!("cleanup failed: {e:#}");
        }
        self.cleaned = true;
    }
}

impl Drop for TestEnv {
    /// A test that panicked did not reach `finish`: stop its services and clean up from a
    /// thread of our own (this one may be the test's runtime).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let all = self.gateways.iter_mut().map(|(_, s)| s);
        for s in all.chain(&mut self.routers).chain(&mut self.stores) {
            s.abort();
        }
        let (urls, subjects, database) =
            (self.urls(), self.subjects.clone(), self.database.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            if let Err(e) = rt.block_on(cleanup(&urls, &subjects, &database)) {
                eprintln!("cleanup of {database} failed: {e:#}");
            }
        })
        .join();
    }
}

fn spawn<F, Fut, E>(run: F) -> Service
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let run = run(Box::pin(async move { stop.cancelled().await }));
    let task = tokio::spawn(async move { run.await.map_err(|e| e.to_string()) });
    Service::Task { cancel, task }
}

/// A loopback address with a port free a moment ago, for a gateway process.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("an address")
}

/// Deletes the namespace's streams, its Redis keys and the database. Each part is tried
/// even when another fails (a test's private NATS or Redis may already be gone).
/// Where a test's backends are, for its cleanup.
pub struct Backends {
    pub nats: String,
    /// The CA NATS's TLS certificate is signed with, when the test made one.
    pub nats_ca: Option<std::path::PathBuf>,
    pub redis: String,
    /// `mysql://user@host:port`, without a database.
    pub mysql: String,
}

/// A NATS client for the test itself, trusting `ca` besides the platform's roots.
pub async fn connect_nats(
    url: &str,
    ca: Option<&std::path::Path>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(ca) = ca {
        options = options.add_root_certificates(ca.to_path_buf());
    }
    options.connect(url).await
}

pub async fn cleanup(urls: &Backends, subjects: &Subjects, database: &str) -> Result<()> {
    let streams = async {
        let nats = connect_nats(&urls.nats, urls.nats_ca.as_deref()).await?;
        delete_streams(&async_nats::jetstream::new(nats), subjects).await;
        anyhow::Ok(())
    };
    let keys = async {
        let redis = redis::Client::open(urls.redis.as_str())?;
        let mut con = redis.get_multiplexed_async_connection().await?;
        let pattern = format!("{}*", subjects.redis_prefix());
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut con)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut con).await?;
        }
        anyhow::Ok(())
    };
    let db = async {
        use sea_orm::ConnectionTrait;
        let db = sea_orm::Database::connect(format!("{}/", urls.mysql)).await?;
        db.execute_unprepared("SET SESSION lock_wait_timeout = 10")
            .await?;
        db.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{database}`"))
            .await?;
        db.close().await?;
        anyhow::Ok(())
    };
    let (streams, keys, db) = tokio::join!(streams, keys, db);
    db.context("dropping the database")?;
    streams.context("deleting the streams")?;
    keys.context("deleting the Redis keys")?;
    Ok(())
}

/// A real WebSocket client speaking PROTOCOL.md.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: User,
    pub hello: Value,
    /// Frames read while waiting for another one, in arrival order.
    unread: VecDeque<Value>,
}

impl Client {
    pub async fn connect(url: &str, user: &User) -> Result<Client> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {}", user.token).parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        let mut client = Client {
            ws,
            user: user.clone(),
            hello: Value::Null,
            unread: VecDeque::new(),
        };
        let hello = client.next_raw().await?;
        if hello["type"] != "hello" {
            bail!("first frame is not hello: {hello}");
        }
        client.hello = hello;
        Ok(client)
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::text(text.to_owned()))
            .await
            .expect("socket accepts a frame");
    }

    /// Sends a frame; `Err` when the socket is gone.
    pub async fn try_send_json(&mut self, value: Value) -> Result<()> {
        self.ws.send(WsMessage::text(value.to_string())).await?;
        Ok(())
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_raw(&mut self, msg: WsMessage) {
        self.ws.send(msg).await.expect("socket accepts a frame");
    }

    /// Sends a message; does not wait for `sent`.
    pub async fn send_msg(&mut self, to: i64, client_id: &str, body: &str) {
        self.send_json(json!({ "type": "send", "client_id": client_id, "to": to, "body": body }))
            .await;
    }

    /// Sends a message and waits for its `sent`; returns the msg_id.
    pub async fn send_and_confirm(&mut self, to: i64, client_id: &str, body: &str) -> String {
        self.send_msg(to, client_id, body).await;
        let sent = self.expect_client_id(client_id).await;
        assert_eq!(sent["type"], "sent", "answer to {client_id}: {sent}");
        sent["msg_id"].as_str().expect("msg_id").to_owned()
    }

    /// The next data frame from the socket itself (not the unread queue).
    async fn next_raw(&mut self) -> Result<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {WAIT:?}"))?
                .ok_or_else(|| anyhow!("socket closed"))??;
            match msg {
                WsMessage::Text(t) => return serde_json::from_str(&t).context("frame is JSON"),
                WsMessage::Close(frame) => bail!("socket closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame, waiting at most `wait`: `Ok(None)` when none came, `Err` when the
    /// socket closed.
    pub async fn recv(&mut self, wait: Duration) -> Result<Option<Value>> {
        if let Some(v) = self.unread.pop_front() {
            return Ok(Some(v));
        }
        loop {
            let msg = match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("socket closed"),
                Ok(Some(m)) => m?,
            };
            match msg {
                WsMessage::Text(t) => return Ok(Some(serde_json::from_str(&t)?)),
                WsMessage::Close(frame) => bail!("socket closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame matching `pred`, keeping others for later; fails after [`WAIT`].
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.unread.iter().position(&pred) {
            return self.unread.remove(i).expect("index in range");
        }
        loop {
            match self.next_raw().await {
                Ok(v) if pred(&v) => return v,
                Ok(v) => self.unread.push_back(v),
                Err(e) => panic!(
                    "{} waiting for {what}: {e:#}; unread: {:?}",
                    self.user.name, self.unread
                ),
            }
        }
    }

    pub async fn expect_type(&mut self, kind: &str) -> Value {
        self.expect(kind, |v| v["type"] == kind).await
    }

    /// The `sent` or `error` answering a client id.
    pub async fn expect_client_id(&mut self, client_id: &str) -> Value {
        self.expect(&format!("answer to {client_id}"), |v| {
            (v["type"] == "sent" || v["type"] == "error") && v["client_id"] == client_id
        })
        .await
    }

    pub async fn expect_error(&mut self, code: &str) -> Value {
        self.expect(&format!("error {code}"), |v| {
            v["type"] == "error" && v["code"] == code
        })
        .await
    }

    /// The `message` frame with this body.
    pub async fn expect_body(&mut self, body: &str) -> Value {
        self.expect(&format!("message {body:?}"), |v| {
            v["type"] == "message" && v["body"] == body
        })
        .await
    }

    /// Reads up to `backlog_done`: the messages before it (in order) and its count.
    pub async fn backlog(&mut self) -> (Vec<Value>, u64) {
        let mut messages = Vec::new();
        loop {
            let frame = match self.unread.pop_front() {
                Some(f) => f,
                None => self.next_raw().await.unwrap_or_else(|e| {
                    panic!("{} waiting for backlog_done: {e:#}", self.user.name)
                }),
            };
            match frame["type"].as_str() {
                Some("backlog_done") => return (messages, frame["count"].as_u64().expect("count")),
                Some("message") => messages.push(frame),
                _ => {}
            }
        }
    }

    /// Collects `message` frames until `n` distinct msg_ids arrived; returns them in arrival
    /// order with duplicates dropped (as a client does) and the number of duplicates seen.
    pub async fn messages(&mut self, n: usize) -> (Vec<Value>, usize) {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut dups = 0;
        while out.len() < n {
            let m = self.expect_type("message").await;
            if seen.insert(m["msg_id"].as_str().expect("msg_id").to_owned()) {
                out.push(m);
            } else {
                dups += 1;
            }
        }
        (out, dups)
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("{}: socket not closed within {WAIT:?}", self.user.name)
                });
            match next {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server acknowledges, so the session is gone when this returns.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.ws.next()).await {}
    }
}

/// Polls `check` until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not within {WAIT:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
