//! The gateway's settings, from flags or the environment (`chat-gateway --help` lists them).

use std::time::Duration;

use chat_runtime::{CommonConfig, parse_duration};

/// Signs tokens when `CHAT_JWT_SECRET` is unset: fine on a laptop, never in production.
pub const DEV_JWT_SECRET: &str = "dev-only-secret-set-CHAT_JWT_SECRET";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chat-gateway",
    version,
    about = "HTTP API and WebSocket edge of the chat"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Address the HTTP and WebSocket server listens on (port 0 picks a free one).
    #[arg(long, env = "CHAT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    /// HS256 key of the tokens; every gateway of a deployment needs the same one.
    #[arg(long, env = "CHAT_JWT_SECRET", default_value = DEV_JWT_SECRET, hide_default_value = true)]
    pub jwt_secret: String,
    /// How long a login token is valid.
    #[arg(long, env = "CHAT_TOKEN_TTL", default_value = "24h", value_parser = parse_duration)]
    pub token_ttl: Duration,
    /// The router's presence TTL; the gateway heartbeats its sessions at a third of it.
    #[arg(long, env = "CHAT_PRESENCE_TTL", default_value = "20s", value_parser = parse_duration)]
    pub presence_ttl: Duration,
    /// Sends a connection may make per second, sustained ...
    #[arg(long, env = "CHAT_SEND_RATE", default_value_t = 200)]
    pub send_rate: u32,
    /// ... and in a burst.
    #[arg(long, env = "CHAT_SEND_BURST", default_value_t = 400)]
    pub send_burst: u32,
    /// Register and login requests one client address may make per minute.
    #[arg(long, env = "CHAT_AUTH_RATE_IP", default_value_t = 600)]
    pub auth_rate_ip: u32,
    /// Login attempts per username per minute, from all addresses together.
    #[arg(long, env = "CHAT_LOGIN_RATE_USER", default_value_t = 10)]
    pub login_rate_user: u32,
    /// Frames queued for one socket before the client counts as not reading and is dropped
    /// (it reconnects and gets its backlog; nobody else waits for it).
    #[arg(
        long,
        env = "CHAT_OUTBOUND_QUEUE",
        default_value_t = 4096,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub outbound_queue: usize,
}
