//! The runtime every chat service shares, and nothing else: logging and trace context
//! ([`telemetry`]), health, readiness and metrics ([`ops`]), NATS connection, streams and JSON
//! request/reply ([`nats`]), the long-running tasks kept alive together ([`tasks`]), the
//! settings every service reads ([`CommonConfig`]), and the shutdown signal
//! ([`shutdown_signal`]).
//! Business logic never lives here.

pub mod nats;
pub mod ops;
pub mod tasks;
pub mod telemetry;

use chat_proto::Subjects;

/// Settings every service reads: where NATS is and which namespace to live in.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonConfig {
    /// NATS server with JetStream.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix of every NATS subject, stream and Redis key, so deployments and tests share
    /// servers without seeing each other: `[a-z0-9_]{1,32}`.
    #[arg(long, env = "CHAT_NAMESPACE", default_value = "chat", value_parser = parse_namespace)]
    pub namespace: Subjects,
}

fn parse_namespace(ns: &str) -> Result<Subjects, chat_proto::NamespaceError> {
    Subjects::new(ns)
}

impl CommonConfig {
    pub fn new(nats_url: impl Into<String>, namespace: Subjects) -> Self {
        CommonConfig {
            nats_url: nats_url.into(),
            namespace,
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM: the signals `scripts/up`, compose and orchestrators send.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// Parses a duration setting: `500ms`, `20s`, `15m`, `24h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let bad = || format!("{s:?} is not a duration such as 500ms, 20s, 15m or 24h");
    let (number, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let n: u64 = number.trim().parse().map_err(|_| bad())?;
    Ok(Duration::from_millis(
        n.checked_mul(unit_ms).ok_or_else(bad)?,
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(super::parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(
            super::parse_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            super::parse_duration("24h"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(super::parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(super::parse_duration("soon").is_err());
    }
}
