//! `chat-bench`: load for the chat through its public contract (HTTP + WebSocket), and the
//! baselines it is measured against. Every scenario prints a table, or with `--json` one JSON
//! object, and exits non-zero when anything was lost or shown twice.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use chat_bench::scenarios::{self, Common, Rate, Search};
use chat_bench::{components, relay, report};

#[derive(Parser)]
#[command(name = "chat-bench", version, about)]
struct Cli {
    /// Print one JSON object per scenario instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open-loop senders paired 1:1 with receivers; `--rate max` finds the highest rate whose
    /// p99 stays within the target.
    Throughput {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Messages per second over all pairs, or `max`.
        #[arg(long, default_value = "1000")]
        rate: Rate,
        /// Seconds each rate is held.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        search: Search,
    },
    /// Unloaded round trips, then latency at half the highest sustainable rate.
    Latency {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// The highest sustainable rate, if known (else it is searched for first).
        #[arg(long)]
        max_rate: Option<f64>,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds to wait at most, before the unloaded part, for the server's processes and
        /// backends to be idle (0: one second's reading, then on).
        #[arg(long, default_value_t = 60.0)]
        quiet_limit: f64,
        #[command(flatten)]
        search: Search,
    },
    /// Authenticated connections doing nothing: server memory per connection, idle CPU.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Distinct users behind the connections (the rest are more devices of them).
        #[arg(long)]
        users: Option<usize>,
        /// Seconds the connections idle while CPU is measured.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
    },
    /// Messages to an offline user, then the replay rate when the user connects.
    Backlog {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Sends awaiting `sent` at a time while filling the backlog (the gateway queues
        /// 256 per connection and answers `rate_limited` beyond).
        #[arg(long, default_value_t = 200)]
        window: usize,
    },
    /// Connections opened all at once: time until every one has `hello`.
    Storm {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
    /// The raw backends: JetStream publish, Redis round trips, MariaDB inserts.
    Components {
        #[command(flatten)]
        backends: components::Backends,
    },
    /// Serve the bare relay (the machine's limit for this workload) until stopped.
    Relay {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
    },
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

/// Runs one command: a scenario's report, or nothing for the relay (which serves until stopped).
async fn run(command: Command) -> anyhow::Result<Option<report::Report>> {
    let report = match command {
        Command::Throughput {
            common,
            pairs,
            rate,
            duration,
            search,
        } => scenarios::throughput(&common, pairs, rate, seconds(duration), &search).await,
        Command::Latency {
            common,
            pairs,
            max_rate,
            duration,
            quiet_limit,
            search,
        } => {
            let (duration, quiet_limit) = (seconds(duration), seconds(quiet_limit));
            scenarios::latency(&common, pairs, max_rate, duration, quiet_limit, &search).await
        }
        Command::Idle {
            common,
            connections,
            users,
            hold,
        } => {
            let users = users.unwrap_or(connections);
            scenarios::idle(&common, connections, users, seconds(hold)).await
        }
        Command::Backlog {
            common,
            messages,
            window,
        } => scenarios::backlog(&common, messages, window.max(1)).await,
        Command::Storm {
            common,
            connections,
        } => scenarios::storm(&common, connections).await,
        Command::Components { backends } => components::run(&backends).await,
        Command::Relay { listen } => return relay::serve(&listen).await.map(|()| None),
    };
    report.map(Some)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let report = match run(cli.command).await {
        Ok(Some(report)) => report,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("reports serialise")
        );
    } else {
        report.print();
    }
    let failures = report.failures();
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "chat-bench: the run does not count: {}",
            failures.join("; ")
        );
        ExitCode::FAILURE
    }
}
