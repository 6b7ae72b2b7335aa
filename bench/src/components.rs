//! The raw speed of the backends the stack is built on, measured the way the stack uses them:
//! JetStream publish with ack (many in flight, and one at a time), Redis round trips (one
//! command each, and pipelined), MariaDB inserts (multi-row, one commit per batch, and one
//! commit per row). Everything made here has a name of its own and is removed afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement, Value};
use serde_json::json;

use crate::procs;
use crate::report::Report;

#[derive(Debug, Clone, clap::Args)]
pub struct Backends {
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// The MariaDB/MySQL server (a database of the tool's own is made and dropped on it).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    pub mysql: String,
    /// Messages (and rows) per measurement.
    #[arg(long, default_value_t = 50_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
}

/// Publishes awaiting their acks at once (the gateway's per-connection window is similar).
const IN_FLIGHT: usize = 256;
/// Rows per multi-row insert (the store's batches are up to 256).
const ROWS_PER_INSERT: usize = 100;

fn per_second(n: usize, took: Duration) -> f64 {
    (n as f64 / took.as_secs_f64()).round()
}

pub async fn run(b: &Backends) -> Result<Report> {
    let tag = crate::chat::run_tag();
    let watch = procs::Watch::start(&procs::targets(None));
    let mut report = Report::new("components", "nats, redis, mariadb");
    // What it made (and removed): stream BENCH_<TAG>, key bench_<tag>:z, database bench_<tag>.
    report.detail("tag", &tag);
    let body = "x".repeat(b.body_size);

    let (async_rate, sync_rate) = nats(&b.nats, &tag, b.messages, &body).await?;
    report.detail("jetstream_publish_async_msgs_s", async_rate);
    report.detail("jetstream_publish_one_by_one_msgs_s", sync_rate);

    let (round_trips, pipelined) = redis(&b.redis, &tag, b.messages).await?;
    report.detail("redis_round_trips_s", round_trips);
    report.detail("redis_pipelined_commands_s", pipelined);

    let (batched, one_by_one) = mariadb(&b.mysql, &tag, b.messages, &body).await?;
    report.detail("mariadb_batched_insert_rows_s", batched);
    report.detail("mariadb_row_per_commit_rows_s", one_by_one);
    report.detail(
        "method",
        json!({
            "jetstream": format!("file stream, {} B payloads, {IN_FLIGHT} publishes in flight vs one at a time", b.body_size),
            "redis": "PING one at a time vs 100 ZSCORE per pipeline",
            "mariadb": format!("InnoDB, {ROWS_PER_INSERT}-row INSERT per commit vs one row per commit"),
        }),
    );
    report.processes = watch.finish();
    Ok(report)
}

async fn nats(url: &str, tag: &str, n: usize, body: &str) -> Result<(f64, f64)> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    let name = format!("BENCH_{}", tag.to_uppercase());
    let subject = format!("bench_{tag}.msg");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(body.to_owned());
    let started = Instant::now();
    let acks = futures::stream::iter(0..n)
        .map(|_| {
            let js = js.clone();
            let (subject, payload) = (subject.clone(), payload.clone());
            async move { js.publish(subject, payload).await?.await }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|ack| std::future::ready(ack.is_err()))
        .count()
        .await;
    anyhow::ensure!(acks == 0, "{acks} publishes were not acked");
    let async_rate = per_second(n, started.elapsed());
    let one_by_one = (n / 10).max(1);
    let started = Instant::now();
    for _ in 0..one_by_one {
        js.publish(subject.clone(), payload.clone()).await?.await?;
    }
    let sync_rate = per_second(one_by_one, started.elapsed());
    js.delete_stream(&name).await?;
    Ok((async_rate, sync_rate))
}

async fn redis(url: &str, tag: &str, n: usize) -> Result<(f64, f64)> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let round_trips = (n / 5).max(1);
    let started = Instant::now();
    for _ in 0..round_trips {
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    }
    let rtt_rate = per_second(round_trips, started.elapsed());
    let key = format!("bench_{tag}:z");
    let started = Instant::now();
    for _ in 0..n / 100 {
        let mut pipe = redis::pipe();
        for i in 0..100 {
            pipe.cmd("ZSCORE").arg(&key).arg(i);
        }
        let _: Vec<Option<f64>> = pipe.query_async(&mut conn).await?;
    }
    let pipelined = per_second(n / 100 * 100, started.elapsed());
    Ok((rtt_rate, pipelined))
}

async fn mariadb(server: &str, tag: &str, n: usize, body: &str) -> Result<(f64, f64)> {
    let database = format!("bench_{tag}");
    let admin = Database::connect(server)
        .await
        .context("connecting to MariaDB")?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE `{database}`"))
        .await?;
    let result = async {
        let db = Database::connect(format!("{server}/{database}")).await?;
        db.execute_unprepared(
            "CREATE TABLE m (id BINARY(16) PRIMARY KEY, sender BIGINT NOT NULL, \
             recipient BIGINT NOT NULL, body TEXT NOT NULL, ts BIGINT NOT NULL) \
             ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        )
        .await?;
        let row = |i: usize| -> Vec<Value> {
            vec![
                uuid::Uuid::now_v7().as_bytes().to_vec().into(),
                (i as i64).into(),
                (i as i64 + 1).into(),
                body.to_owned().into(),
                (i as i64).into(),
            ]
        };
        let batch_sql = format!(
            "INSERT INTO m (id, sender, recipient, body, ts) VALUES {}",
            vec!["(?, ?, ?, ?, ?)"; ROWS_PER_INSERT].join(", ")
        );
        let started = Instant::now();
        let batches = n / ROWS_PER_INSERT;
        for b in 0..batches {
            let values = (0..ROWS_PER_INSERT)
                .flat_map(|i| row(b * ROWS_PER_INSERT + i))
                .collect::<Vec<_>>();
            db.execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                &batch_sql,
                values,
            ))
            .await?;
        }
        let batched = per_second(batches * ROWS_PER_INSERT, started.elapsed());
        let singles = (n / 50).max(1);
        let started = Instant::now();
        for i in 0..singles {
            db.execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "INSERT INTO m (id, sender, recipient, body, ts) VALUES (?, ?, ?, ?, ?)",
                row(i),
            ))
            .await?;
        }
        let single = per_second(singles, started.elapsed());
        anyhow::Ok((batched, single))
    }
    .await;
    admin
        .execute_unprepared(&format!("DROP DATABASE `{database}`"))
        .await?;
    result
}
