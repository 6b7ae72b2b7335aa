//! Smoke runs of every `chat-bench` scenario against a deployment of this test's own (and
//! the bare relay): each must deliver everything exactly once. Never a speed: speed is for
//! `docs/benchmarks.md`, measured on release builds.

use std::process::Stdio;

use chat_tests::procs::bin_path;
use chat_tests::{MYSQL_SERVER, NATS_URL, Options, TestEnv, WAIT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Runs `chat-bench <args> --json`, requires success and returns its report.
async fn bench(args: &[&str]) -> Value {
    let output = Command::new(bin_path("chat-bench"))
        .args(args)
        .arg("--json")
        .output()
        .await
        .expect("chat-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chat-bench {args:?} failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not a report ({e}): {stdout}"))
}

/// Everything sent arrived, once.
fn assert_complete(report: &Value) {
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert!(report["sent"].as_u64() > Some(0), "{report}");
    assert_eq!(report["delivered"], report["sent"], "{report}");
}

fn bench_options() -> Options {
    Options {
        // One client address registering and sending for many users.
        send_rate: 100_000,
        send_burst: 100_000,
        auth_rate_ip: 100_000,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_delivers_everything_once_against_the_stack() {
    let env = TestEnv::start(bench_options()).await;
    let base = env.base_url(0);
    let base = base.as_str();

    let run = bench(&[
        "throughput",
        "--base",
        base,
        "--pairs",
        "4",
        "--rate",
        "200",
        "--duration",
        "2",
    ])
    .await;
    assert_complete(&run);
    assert_eq!(run["scenario"], "throughput");
    assert!(run["latency_ms"]["p99"].as_f64() > Some(0.0), "{run}");

    let run = bench(&[
        "latency",
        "--base",
        base,
        "--pairs",
        "4",
        "--max-rate",
        "200",
        "--duration",
        "1",
    ])
    .await;
    assert_complete(&run);
    assert!(
        run["half_max"]["latency_ms"]["p50"].as_f64() > Some(0.0),
        "{run}"
    );

    let run = bench(&["backlog", "--base", base, "--messages", "300"]).await;
    assert_complete(&run);
    assert_eq!(run["backlog_done_count"], 300, "{run}");

    let run = bench(&[
        "idle",
        "--base",
        base,
        "--connections",
        "40",
        "--users",
        "10",
        "--hold",
        "1",
    ])
    .await;
    assert_eq!(run["connections"], 40, "{run}");
    assert_eq!(run["still_open_after_hold"], 40, "{run}");

    let run = bench(&["storm", "--base", base, "--connections", "40"]).await;
    assert_eq!(run["connected"], 40, "{run}");

    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bare_relay_carries_the_same_load() {
    let mut relay = Command::new(bin_path("chat-bench"))
        .args(["relay", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the relay starts");
    let mut lines = BufReader::new(relay.stderr.take().expect("piped")).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the relay says where it listens")
        .expect("stderr reads")
        .expect("a line");
    let base = line
        .split_whitespace()
        .last()
        .expect("the line ends with the URL")
        .to_owned();

    let run = bench(&[
        "throughput",
        "--base",
        &base,
        "--pairs",
        "4",
        "--rate",
        "400",
        "--duration",
        "1",
    ])
    .await;
    assert_complete(&run);
    relay.kill().await.expect("the relay stops");
}

#[tokio::test]
async fn the_raw_backends_are_timed_and_left_clean() {
    let run = bench(&["components", "--messages", "1000"]).await;
    for figure in [
        "jetstream_publish_async_msgs_s",
        "redis_round_trips_s",
        "mariadb_batched_insert_rows_s",
    ] {
        assert!(run[figure].as_f64() > Some(0.0), "{figure}: {run}");
    }
    let tag = run["tag"].as_str().expect("the report names what it made");
    let js = async_nats::jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    let stream = format!("BENCH_{}", tag.to_uppercase());
    assert!(js.get_stream(&stream).await.is_err(), "{stream} is left");
    use sea_orm::ConnectionTrait;
    let db = sea_orm::Database::connect(MYSQL_SERVER).await.unwrap();
    let left = db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::MySql,
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            [format!("bench_{tag}").into()],
        ))
        .await
        .unwrap();
    assert!(left.is_none(), "database bench_{tag} is left");
}
