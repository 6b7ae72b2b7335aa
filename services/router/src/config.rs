//! The router's settings, from flags or the environment (`chat-router --help` lists them).

use std::time::Duration;

use chat_runtime::CommonConfig;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chat-router",
    version,
    about = "Presence and the live-or-offline decision"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (`:0` picks a free port).
    #[arg(long, env = "CHAT_OPS_ADDR", default_value = "127.0.0.1:8081")]
    pub ops_addr: String,
    /// Redis, where presence lives.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// How long a session stays online without a heartbeat from its gateway: the most a
    /// crashed gateway's users keep showing online. Gateways beat at a third of it.
    #[arg(long, env = "CHAT_PRESENCE_TTL", default_value = "20s", value_parser = chat_runtime::parse_duration)]
    pub presence_ttl: Duration,
    /// How long a message handed to this service may stay unacknowledged before JetStream
    /// gives it to another replica: the pause after a crash before its work is redone.
    #[arg(long, env = "CHAT_ACK_WAIT", default_value = "30s", value_parser = chat_runtime::parse_duration)]
    pub ack_wait: std::time::Duration,
}
