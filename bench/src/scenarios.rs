//! The scenarios: each drives a server through its public contract and returns one report.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::chat::{Api, Event, MAX_ACK_IDS, Protocol};
use crate::load::{self, Fleet, Step};
use crate::procs::{self, round3};
use crate::report::{self, Latency, Report};

/// What every scenario that opens sessions needs to know.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// The server's HTTP base URL (the WebSocket is `/ws` on it); with `--target xmpp`, the
    /// WebSocket URL (e.g. ws://127.0.0.1:5280/ws).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base: String,
    /// What the server speaks.
    #[arg(long, value_enum, default_value_t = Protocol::Chat)]
    pub target: Protocol,
    /// Keep registered accounts (and their tokens) in this file and reuse them next time:
    /// registering and logging in thousands of users costs the server an argon2 hash each.
    #[arg(long)]
    pub accounts: Option<PathBuf>,
    /// Characters per message body (PROTOCOL.md allows up to 4096).
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
}

/// How hard `throughput` pushes.
#[derive(Debug, Clone, Copy)]
pub enum Rate {
    Fixed(f64),
    /// Find the highest rate whose p99 stays within the target.
    Max,
}

impl Common {
    fn api(&self) -> Result<Api> {
        Api::new(&self.base, self.target)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 => Ok(Rate::Fixed(r)),
            _ => Err(format!("{s:?} is neither a positive number nor `max`")),
        }
    }
}

/// How the search for the highest sustainable rate proceeds.
#[derive(Debug, Clone, clap::Args)]
pub struct Search {
    /// The rate (msgs/s) the search starts at; it doubles until a step fails, then bisects.
    #[arg(long, default_value_t = 1000.0)]
    pub start_rate: f64,
    /// A step passes when its p99 is at most this many milliseconds ...
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// ... and it delivered at least this share of the offered rate, everything, once ...
    #[arg(long, default_value_t = 0.95)]
    pub keep_up: f64,
    /// ... and the stored side kept pace: every `delivered` receipt came, at p99 at most this
    /// many milliseconds after `sent` (a server that sends no receipts is not judged on them).
    #[arg(long, default_value_t = 1000.0)]
    pub receipt_p99_ms: f64,
    /// Stop bisecting when the bracket is narrower than this share of the rate.
    #[arg(long, default_value_t = 0.05)]
    pub precision: f64,
}

async fn fleet(common: &Common, pairs: usize) -> Result<Fleet> {
    let api = common.api()?;
    let accounts = api.accounts(pairs * 2, common.accounts.as_deref()).await?;
    Fleet::connect(&api, &accounts, common.body_size).await
}

fn step_json(step: &Step, within: bool) -> serde_json::Value {
    let mut value = serde_json::to_value(&step.report).expect("reports serialise");
    value["within_target"] = json!(within);
    value
}

fn passes(step: &Step, search: &Search) -> bool {
    let offered = step.report.details["offered_msgs_s"]
        .as_f64()
        .unwrap_or(0.0);
    step.report.failures().is_empty()
        && step.latency.p99 <= search.p99_ms
        && step.report.throughput_msgs_s >= offered * search.keep_up
        && step
            .receipts
            .as_ref()
            .is_none_or(|r| r.missing == 0 && r.latency.p99 <= search.receipt_p99_ms)
}

/// Adds a step's counts (and problems) to the totals of a multi-step report.
fn absorb(total: &mut Report, step: &Step) {
    total.add_counts(&step.report);
    let offered = &step.report.details["offered_msgs_s"];
    total.problems.extend(
        step.report
            .problems
            .iter()
            .map(|p| format!("at {offered} msgs/s: {p}")),
    );
}

/// Open-loop load at a fixed rate, or the search for the highest rate within the target.
pub async fn throughput(
    common: &Common,
    pairs: usize,
    rate: Rate,
    duration: Duration,
    search: &Search,
) -> Result<Report> {
    let mut fleet = fleet(common, pairs).await?;
    match rate {
        Rate::Fixed(rate) => Ok(fleet.step(rate, duration).await.report),
        // Counts and problems over every step; the figures of the best step.
        Rate::Max => {
            let (best, mut total) = find_max(&mut fleet, duration, search).await;
            match best {
                Some(best) => {
                    let max = best.report.details["offered_msgs_s"].clone();
                    total.throughput_msgs_s = best.report.throughput_msgs_s;
                    total.latency_ms = best.report.latency_ms;
                    total.processes = best.report.processes;
                    total.details.extend(best.report.details);
                    total.detail("max_rate_msgs_s", max);
                }
                None => total
                    .problems
                    .push("no rate met the target, not even the first".into()),
            }
            Ok(total)
        }
    }
}

/// Steps up from `start_rate`, doubling while steps pass, then bisects between the best
/// passing and the lowest failing rate. Returns the best passing step and the totals, with
/// every step under `steps`.
async fn find_max(
    fleet: &mut Fleet,
    duration: Duration,
    search: &Search,
) -> (Option<Step>, Report) {
    let mut total = Report::new("throughput", fleet.target());
    let mut steps = Vec::new();
    let mut best: Option<Step> = None;
    let mut lowest_failing: Option<f64> = None;
    let mut rate = search.start_rate;
    loop {
        let step = fleet.step(rate, duration).await;
        let ok = passes(&step, search);
        absorb(&mut total, &step);
        steps.push(step_json(&step, ok));
        let receipts = step.receipts.as_ref().map_or(String::new(), |r| {
            format!(
                ", receipts p99 {} ms ({} missing)",
                r.latency.p99, r.missing
            )
        });
        eprintln!(
            "{rate:>8.0} msgs/s offered: {:>8.0} delivered/s, p99 {} ms{receipts}{}",
            step.report.throughput_msgs_s,
            step.latency.p99,
            if ok { "" } else { "  (over the target)" }
        );
        let lost_or_broken = step.report.lost > 0 || step.report.duplicates > 0;
        if ok {
            best = Some(step);
        } else {
            lowest_failing = Some(lowest_failing.map_or(rate, |r: f64| r.min(rate)));
        }
        if lost_or_broken || steps.len() >= 16 {
            break;
        }
        let good = best
            .as_ref()
            .and_then(|s| s.report.details["offered_msgs_s"].as_f64())
            .unwrap_or(0.0);
        rate = match lowest_failing {
            None => rate * 2.0,
            // Not even a trickle passes: no point bisecting towards zero.
            Some(bad) if good == 0.0 && bad <= MIN_RATE => break,
            Some(bad) if bad - good <= bad * search.precision => break,
            Some(bad) => ((good + bad) / 2.0).round(),
        };
    }
    total.detail("steps", steps);
    (best, total)
}

/// The lowest rate the search tries.
const MIN_RATE: f64 = 10.0;

/// Unloaded round trips (one pair, at a rate where no message waits for another, once the
/// machine is idle or `quiet_limit` has passed), then latency at half the highest sustainable
/// rate; each measured for `duration`.
pub async fn latency(
    common: &Common,
    pairs: usize,
    max_rate: Option<f64>,
    duration: Duration,
    quiet_limit: Duration,
    search: &Search,
) -> Result<Report> {
    let mut report = Report::new("latency", &common.base);
    let mut quiet = fleet(common, 1).await?;
    // Unloaded means no other work either: not the tail of a scenario run just before.
    let (waited, cores) = quiet.until_quiet(quiet_limit).await;
    report.detail(
        "quiet_before_unloaded",
        json!({"waited_s": round3(waited.as_secs_f64()), "cores_in_use": round3(cores)}),
    );
    absorb(&mut report, &quiet.step(UNLOADED_RATE, WARM_UP).await);
    let unloaded = quiet.step(UNLOADED_RATE, duration).await;
    drop(quiet);
    let mut busy = fleet(common, pairs).await?;
    let max_rate = match max_rate {
        Some(rate) => rate,
        None => {
            let (best, found) = find_max(&mut busy, duration, search).await;
            report.add_counts(&found);
            report.problems.extend(found.problems);
            best.and_then(|s| s.report.details["offered_msgs_s"].as_f64())
                .context("no rate met the target, so there is no half of it")?
        }
    };
    let half_rate = (max_rate / 2.0).round();
    absorb(&mut report, &busy.step(half_rate, WARM_UP).await);
    let half = busy.step(half_rate, duration).await;
    absorb(&mut report, &unloaded);
    absorb(&mut report, &half);
    report.throughput_msgs_s = half.report.throughput_msgs_s;
    report.latency_ms = Some(unloaded.latency);
    report.processes = half.report.processes.clone();
    report.detail(
        "unloaded",
        json!({
            "rate_msgs_s": UNLOADED_RATE,
            "latency_ms": unloaded.latency,
        }),
    );
    report.detail(
        "half_max",
        json!({
            "max_rate_msgs_s": max_rate,
            "rate_msgs_s": half_rate,
            "latency_ms": half.latency,
        }),
    );
    Ok(report)
}

/// A fleet's first moments (its sessions just announced, with their presence fan-out; the
/// gateway's cache of known recipients filling) are not the steady state the latency figures
/// are about: before each measured step the fleet runs this long at the same rate, counted
/// for losses and duplicates like everything else, not for latency.
const WARM_UP: Duration = Duration::from_secs(2);

/// One pair sending this many messages a second leaves ~5 ms between messages: each one
/// crosses an idle system.
const UNLOADED_RATE: f64 = 200.0;

/// `n` authenticated sessions that do nothing: the server's memory per connection and its
/// CPU while they idle (pings, presence heartbeats).
pub async fn idle(
    common: &Common,
    connections: usize,
    users: usize,
    hold: Duration,
) -> Result<Report> {
    let api = common.api()?;
    let users = users.clamp(1, connections.max(1));
    let accounts = api.accounts(users, common.accounts.as_deref()).await?;
    let port = api.server_port();
    let server = port.and_then(procs::listener_pid);
    let before = server.and_then(procs::rss_bytes);
    let url = api.ws_url();
    let bar = report::bar(connections as u64, "connected");
    let opened = Instant::now();
    // Each session is read from the moment its start is over: reading answers the server's
    // pings and ack requests, which a server may close a session for leaving unanswered.
    let sessions: Vec<Result<JoinHandle<()>>> = futures::stream::iter(0..connections)
        .map(|i| {
            let (api, bar) = (&api, bar.clone());
            let account = &accounts[i % accounts.len()];
            let source = load::source(i, &url);
            async move {
                let mut session = api.connect(account, source).await?;
                // Counted once its start is over, so the measurement sees only idling.
                session.until_backlog_done().await?;
                bar.inc(1);
                anyhow::Ok(tokio::spawn(session.idle()))
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    bar.finish_and_clear();
    let connect_s = opened.elapsed().as_secs_f64();
    let mut failures = Vec::new();
    let mut readers = Vec::new();
    for session in sessions {
        match session {
            Ok(reader) => readers.push(reader),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let open = readers.len();
    let after = server.and_then(procs::rss_bytes);
    let server_cpu = server.and_then(procs::cpu_seconds);
    let watch = procs::Watch::start(&procs::targets(port));
    tokio::time::sleep(hold).await;
    let processes = watch.finish();
    let still_open = readers.iter().filter(|r| !r.is_finished()).count();
    let mut report = Report::new("idle", &common.base);
    report.detail("connections", open);
    report.detail("users", users);
    report.detail("connect_s", round3(connect_s));
    report.detail("hold_s", hold.as_secs_f64());
    report.detail("still_open_after_hold", still_open);
    if let (Some(before), Some(after)) = (before, after) {
        let per = after.saturating_sub(before) as f64 / open.max(1) as f64;
        report.detail("server_rss_before_mib", round3(before as f64 / 1048576.0));
        report.detail("server_rss_after_mib", round3(after as f64 / 1048576.0));
        report.detail("rss_per_connection_kib", round3(per / 1024.0));
    }
    if let (Some(pid), Some(cpu_before)) = (server, server_cpu)
        && let Some(cpu_after) = procs::cpu_seconds(pid)
    {
        let core_share = (cpu_after - cpu_before) / hold.as_secs_f64();
        report.detail("server_cpu_percent_of_a_core", round3(core_share * 100.0));
        report.detail(
            "server_cpu_percent_per_10k_connections",
            round3(core_share * 100.0 * 10_000.0 / open.max(1) as f64),
        );
    }
    report.processes = processes;
    if let Some(first) = failures.first() {
        report.problems.push(format!(
            "{} connections failed, the first: {first}",
            failures.len()
        ));
    }
    if still_open < open {
        report.problems.push(format!(
            "{} connections dropped while idle",
            open - still_open
        ));
    }
    for reader in readers {
        reader.abort();
    }
    Ok(report)
}

/// `messages` sent to a user who is offline, then the rate at which they are replayed when
/// the user connects (from `hello` to `backlog_done`), checked complete, in order, once.
///
/// XMPP has no end-of-replay marker: there the replay ends with the last message.
pub async fn backlog(common: &Common, messages: u64, window: usize) -> Result<Report> {
    let api = common.api()?;
    let marked = api.protocol() == Protocol::Chat;
    // Fresh accounts: a reused receiver would bring an old backlog along.
    let accounts = api.accounts(2, None).await?;
    let (sender, receiver) = (&accounts[0], &accounts[1]);
    let run = crate::chat::run_tag();
    let watched = procs::targets(api.server_port());

    // Send with `window` messages awaiting `sent` at a time.
    let (mut writer, mut reader) = api.connect(sender, None).await?.split();
    let to = receiver.peer();
    let bar = report::bar(messages, "offline");
    let (mut written, mut accepted) = (0u64, 0u64);
    let mut newest = String::new();
    let sending = Instant::now();
    while accepted < messages {
        while written < messages && written - accepted < window as u64 {
            let body = load::body(&run, 0, written, Instant::now(), common.body_size);
            writer.send(&to, &format!("{run}-{written}"), &body).await?;
            written += 1;
        }
        match reader.next().await? {
            Some(Event::Sent { msg_id, .. }) => {
                newest = newest.max(msg_id);
                accepted += 1;
                bar.inc(1);
            }
            Some(Event::Error { code, .. }) => bail!("a send was refused: {code}"),
            Some(_) => {}
            None => bail!("the server closed the sender's session"),
        }
    }
    let send_s = sending.elapsed().as_secs_f64();
    bar.finish_and_clear();
    writer.close().await;
    // The chat's `sent` means durable, not stored yet: wait until the history shows the last
    // message, so that what follows times the replay, not the store catching up. (ejabberd
    // stores an offline message while routing it, before it acks the stanza.)
    if marked {
        let stored_by = Instant::now() + STORE_PATIENCE;
        while api
            .newest_message(&sender.token, receiver.user_id)
            .await?
            .as_deref()
            != Some(&newest)
        {
            if Instant::now() > stored_by {
                bail!("the last message was not in the history after {STORE_PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let store_s = sending.elapsed().as_secs_f64() - send_s;

    let watch = procs::Watch::start(&watched);
    let connecting = Instant::now();
    let session = api.connect(receiver, None).await?;
    let hello = Instant::now();
    let (mut acks, mut reader) = session.split();
    let bar = report::bar(messages, "replayed");
    let mut next_seq = 0u64;
    let (mut delivered, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64);
    let mut unacked = Vec::new();
    let mut hist = report::histogram();
    let mut count = None;
    loop {
        let event = if marked {
            reader.next().await?
        } else {
            match tokio::time::timeout(LATE_PATIENCE, reader.next()).await {
                Ok(event) => event?,
                Err(_) => break,
            }
        };
        match event {
            Some(Event::Message { msg_id, body, .. }) => {
                if let Some(stamp) = load::parse_body(&run, &body) {
                    hist.saturating_record(load::micros_since(stamp.at));
                    if stamp.seq == next_seq {
                        delivered += 1;
                        next_seq += 1;
                    } else if stamp.seq < next_seq {
                        duplicates += 1;
                    } else {
                        out_of_order += 1;
                    }
                    bar.inc(1);
                }
                unacked.push(msg_id);
                if unacked.len() == MAX_ACK_IDS {
                    acks.ack(&unacked).await?;
                    unacked.clear();
                }
                if !marked && delivered + duplicates + out_of_order >= messages {
                    break;
                }
            }
            Some(Event::BacklogDone { count: c }) if marked => {
                count = Some(c);
                break;
            }
            Some(_) => {}
            None => bail!("the server closed the receiver's session during the replay"),
        }
    }
    let replay = hello.elapsed();
    // Anything still missing may come live after `backlog_done` (late: a broken promise, but
    // not lost); wait for it a while.
    let mut late = 0u64;
    while marked && delivered + late < messages {
        match tokio::time::timeout(LATE_PATIENCE, reader.next()).await {
            Ok(Ok(Some(Event::Message { body, .. }))) => {
                if load::parse_body(&run, &body).is_some() {
                    late += 1;
                }
            }
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    bar.finish_and_clear();
    if !unacked.is_empty() {
        acks.ack(&unacked).await?;
    }
    acks.close().await;

    let mut report = Report::new("backlog", &common.base);
    report.sent = messages;
    report.delivered = delivered + late;
    report.lost = messages - report.delivered.min(messages);
    report.duplicates = duplicates;
    report.throughput_msgs_s = (delivered as f64 / replay.as_secs_f64()).round();
    report.processes = watch.finish();
    report.detail("replay_msgs_s", report.throughput_msgs_s);
    report.detail("replay_s", round3(replay.as_secs_f64()));
    report.detail(
        "connect_to_hello_ms",
        round3((hello - connecting).as_secs_f64() * 1000.0),
    );
    report.detail("send_s", round3(send_s));
    report.detail("store_catch_up_s", round3(store_s));
    report.detail("age_at_replay_ms", Latency::of(&hist));
    if late > 0 {
        report
            .problems
            .push(format!("{late} messages came after backlog_done"));
    }
    if out_of_order > 0 {
        report
            .problems
            .push(format!("{out_of_order} messages out of order"));
    }
    if let Some(count) = count {
        report.detail("backlog_done_count", count);
        if count != delivered {
            report.problems.push(format!(
                "backlog_done says {count} but {delivered} of this run's messages came"
            ));
        }
    }
    Ok(report)
}

/// How long the backlog scenario waits for the store to hold every message.
const STORE_PATIENCE: Duration = Duration::from_secs(120);
/// How long it waits for messages missing at `backlog_done`.
const LATE_PATIENCE: Duration = Duration::from_secs(10);

/// `connections` sessions opened at the same moment: how long until every one has `hello`
/// (and `backlog_done`).
pub async fn storm(common: &Common, connections: usize) -> Result<Report> {
    let api = common.api()?;
    let accounts = api
        .accounts(connections, common.accounts.as_deref())
        .await?;
    let url = api.ws_url();
    let watch = procs::Watch::start(&procs::targets(api.server_port()));
    let start = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = accounts
        .iter()
        .enumerate()
        .map(|(i, account)| {
            let (api, account) = (api.clone(), account.clone());
            let source = load::source(i, &url);
            let mut go = start.1.clone();
            tokio::spawn(async move {
                let _ = go.wait_for(|go| *go).await;
                let began = Instant::now();
                let mut session = api.connect(&account, source).await?;
                let hello = began.elapsed();
                session.until_backlog_done().await?;
                anyhow::Ok((hello, began.elapsed(), session))
            })
        })
        .collect();
    let began = Instant::now();
    start.0.send(true).expect("the tasks hold receivers");
    let bar = report::bar(connections as u64, "hello");
    let (mut hellos, mut dones) = (report::histogram(), report::histogram());
    let mut failures = Vec::new();
    let mut sessions = Vec::new();
    for task in tasks {
        match task.await? {
            Ok((hello, done, session)) => {
                hellos.saturating_record(hello.as_micros() as u64);
                dones.saturating_record(done.as_micros() as u64);
                sessions.push(session);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut report = Report::new("storm", &common.base);
    report.processes = watch.finish();
    report.latency_ms = Some(Latency::of(&hellos));
    report.detail("connections", connections);
    report.detail("connected", sessions.len());
    report.detail("all_hello_s", round3(hellos.max() as f64 / 1_000_000.0));
    report.detail(
        "all_backlog_done_s",
        round3(dones.max() as f64 / 1_000_000.0),
    );
    report.detail("backlog_done_ms", Latency::of(&dones));
    report.detail("wall_s", round3(began.elapsed().as_secs_f64()));
    if !failures.is_empty() {
        report.problems.push(format!(
            "{} connections failed, the first: {}",
            failures.len(),
            failures[0]
        ));
    }
    Ok(report)
}
