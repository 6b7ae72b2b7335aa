//! The store's settings, from flags or the environment (`chat-store --help` lists them).

use chat_runtime::CommonConfig;

/// How long a batch of store work that is not full waits for more, by default
/// ([`Config::batch_linger`]).
pub const DEFAULT_BATCH_LINGER: &str = "5ms";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chat-store",
    version,
    about = "Owns users, messages and receipts in MySQL"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (`:0` picks a free port).
    #[arg(long, env = "CHAT_OPS_ADDR", default_value = "127.0.0.1:8082")]
    pub ops_addr: String,
    /// MySQL (or MariaDB); the database is created if missing and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306/chat"
    )]
    pub database_url: String,
    /// Apply pending migrations, then exit.
    #[arg(long)]
    pub migrate_only: bool,
    /// How long a message handed to this service may stay unacknowledged before JetStream
    /// gives it to another replica: the pause after a crash before its work is redone.
    #[arg(long, env = "CHAT_ACK_WAIT", default_value = "30s", value_parser = chat_runtime::parse_duration)]
    pub ack_wait: std::time::Duration,
    /// How long a batch of store work that is not full waits for more to join it: fewer,
    /// larger transactions (less CPU in the store and the database under load) for "stored"
    /// notices and receipts up to that much later. Live delivery does not wait on it: the
    /// router pushes before the store writes.
    #[arg(long, env = "CHAT_STORE_LINGER", default_value = DEFAULT_BATCH_LINGER, value_parser = chat_runtime::parse_duration)]
    pub batch_linger: std::time::Duration,
}
