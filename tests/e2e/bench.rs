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
        // Tests run side by side: the machine is never idle.
        "--quiet-limit",
        "0",
    ])
    .await;
    assert_complete(&run);
    assert!(
        run["half_max"]["latency_ms"]["p50"].as_f64() > Some(0.0),
        "{run}"
    );
    assert!(
        run["quiet_before_unloaded"]["waited_s"].as_f64() >= Some(1.0),
        "a second's reading at least: {run}"
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

/// `bench/run` starts a scenario as soon as the gateway answers, when the store may not be
/// answering yet: the gateway then says `503 not_ready`, which PROTOCOL.md says to retry. The
/// tool retries (and says so) instead of failing the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_waits_for_a_store_that_is_not_answering_yet() {
    let mut env = TestEnv::start(Options {
        stores: 0,
        ..bench_options()
    })
    .await;
    let base = env.base_url(0);
    let mut run = Command::new(bin_path("chat-bench"))
        .args(["throughput", "--base", &base, "--pairs", "2"])
        .args(["--rate", "20", "--duration", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chat-bench runs");
    let mut lines = BufReader::new(run.stderr.take().expect("piped")).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("stderr reads") {
            if line.contains("is not ready (503); retrying") {
                return;
            }
        }
        panic!("chat-bench ended without being turned away");
    })
    .await
    .expect("chat-bench is turned away while no store runs");
    // Read the rest, so that the tool never waits on a full pipe.
    let stderr = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });

    env.start_store().await;
    let output = run.wait_with_output().await.expect("chat-bench ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chat-bench failed ({}): {stdout}\n{}",
        output.status,
        stderr.await.unwrap().join("\n")
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("a report");
    assert_complete(&report);
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

/// ejabberd (bench/scripts/ejabberd) on a port and, with SQL, a database of its own; stopped
/// (its node, spool and database gone) when dropped, even by a failing test.
struct Ejabberd {
    script: std::process::Child,
    ws: String,
}

impl Ejabberd {
    async fn start(db: &str) -> Ejabberd {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let database = format!(
            "test_ejabberd_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let script = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bench/scripts/ejabberd"
        ))
        .env("EJABBERD_PORT", port.to_string())
        .env("EJABBERD_DB", db)
        .env("EJABBERD_SQL_DATABASE", &database)
        .env("EJABBERD_DROP_DB", "1")
        .spawn()
        .expect("bench/scripts/ejabberd starts (scripts/test installs ejabberd)");
        let mut ejabberd = Ejabberd {
            script,
            ws: format!("ws://127.0.0.1:{port}/ws"),
        };
        // It listens once its modules are up.
        let deadline = tokio::time::Instant::now() + EJABBERD_START;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = ejabberd.script.try_wait() {
                panic!("bench/scripts/ejabberd exited ({status}) before ejabberd listened");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ejabberd did not listen on {port} within {EJABBERD_START:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        ejabberd
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.script.id().to_string()])
            .status();
        let _ = self.script.wait();
    }
}

/// How long an Erlang node may take to start on a busy machine.
const EJABBERD_START: std::time::Duration = std::time::Duration::from_secs(90);

/// The XMPP driver (issue 7's comparison) against ejabberd with `store`: every scenario
/// delivers everything once.
async fn xmpp_smoke(store: &str) {
    let ejabberd = Ejabberd::start(store).await;
    let base = ejabberd.ws.as_str();
    let xmpp = ["--target", "xmpp", "--base", base];

    let run = bench(
        &[
            &["throughput"][..],
            &xmpp,
            &["--pairs", "4", "--rate", "200", "--duration", "2"],
        ]
        .concat(),
    )
    .await;
    assert_complete(&run);
    assert!(run["latency_ms"]["p99"].as_f64() > Some(0.0), "{run}");
    assert_eq!(run["accepted"], run["sent"], "every send acked: {run}");

    let run = bench(&[&["backlog"][..], &xmpp, &["--messages", "300"]].concat()).await;
    assert_complete(&run);

    let run = bench(
        &[
            &["idle"][..],
            &xmpp,
            &["--connections", "40", "--users", "10", "--hold", "1"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(run["connections"], 40, "{run}");
    assert_eq!(run["still_open_after_hold"], 40, "{run}");

    let run = bench(&[&["storm"][..], &xmpp, &["--connections", "40"]].concat()).await;
    assert_eq!(run["connected"], 40, "{run}");
    drop(ejabberd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_xmpp_driver_delivers_everything_once_against_ejabberd_on_mariadb() {
    xmpp_smoke("sql").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_xmpp_driver_delivers_everything_once_against_ejabberd_on_mnesia() {
    xmpp_smoke("mnesia").await;
}
