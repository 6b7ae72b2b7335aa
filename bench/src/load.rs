//! Open-loop load over pairs of sessions.
//!
//! Each pair's sender sends on a fixed schedule whatever the server does and writes the
//! scheduled time into the body (plus at most [`TIMER_SLACK`] of its own timer's lateness);
//! the pair's receiver measures from that time to the `message` frame. A server that falls
//! behind therefore shows it as latency instead of quietly slowing the sender down (no
//! coordinated omission). Receivers ack what they get, as every real client does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use url::Url;

use crate::chat::{Account, Api, Event, MAX_ACK_IDS, Peer, Reader, Session, Writer};
use crate::procs::{self, Target, Usage};
use crate::report::{self, Latency};

/// tokio's timer wakes a sleeper on the first millisecond tick after its deadline, so every
/// send starts up to this much after its scheduled time through the tool's own clock. That
/// much lateness is stamped as the send time and not counted; beyond it (a sender held up,
/// e.g. by a server that stopped reading) the lateness counts as latency.
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Sessions opened at once while setting up.
const CONNECT_CONCURRENCY: usize = 64;
/// How long the tool waits for the last messages once nothing has arrived any more.
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);
/// A receiver acks after this many messages, or after [`ACK_EVERY`].
const ACK_BATCH: usize = 200;
const ACK_EVERY: Duration = Duration::from_millis(100);
/// After the last message, how long the tool waits for `delivered` receipts to stop coming
/// before the next step (so one step's leftover work does not land in the next; a server
/// that sends no receipts, like the bare relay, costs this once per step).
const SETTLE_QUIET: Duration = Duration::from_secs(2);
/// A delivery this late or later is counted in the step's `slow` detail, by the second of
/// the step it was sent in: a stall shows where it happened, not only in the percentiles.
const SLOW: Duration = Duration::from_millis(50);
/// Seconds listed in `slow`, the slowest first.
const SLOW_LISTED: usize = 10;

/// The instant body timestamps count from (the same in senders and receivers: one process).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `run:step:seq:micros:` then padding to `size` characters.
pub fn body(run: &str, step: u32, seq: u64, at: Instant, size: usize) -> String {
    let micros = at.saturating_duration_since(epoch()).as_micros();
    let mut body = format!("{run}:{step}:{seq}:{micros}:");
    while body.len() < size {
        body.push('x');
    }
    body
}

/// What a body says, if it is one of this run's.
pub struct Stamp {
    pub step: u32,
    pub seq: u64,
    pub at: Instant,
}

pub fn parse_body(run: &str, body: &str) -> Option<Stamp> {
    let mut parts = body.split(':');
    if parts.next()? != run {
        return None;
    }
    let step = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let micros: u64 = parts.next()?.parse().ok()?;
    Some(Stamp {
        step,
        seq,
        at: epoch() + Duration::from_micros(micros),
    })
}

/// Microseconds from `at` to now, for a histogram (at least 1).
pub fn micros_since(at: Instant) -> u64 {
    (Instant::now().saturating_duration_since(at).as_micros() as u64).max(1)
}

/// The local address of the `i`th session to `url`: against a loopback server 127.0.0.2, .3,
/// ... (all of 127/8 is loopback), so that tens of thousands of sessions do not exhaust one
/// address's ports; otherwise whatever the system picks.
pub fn source(i: usize, url: &Url) -> Option<IpAddr> {
    let loopback = url.host_str().is_some_and(|h| h.starts_with("127."));
    loopback.then(|| IpAddr::from([127, 0, (2 + i / 250) as u8 % 255, (2 + i % 250) as u8]))
}

/// Send `count` messages, one every `interval`, from `start`.
#[derive(Clone, Copy)]
struct Order {
    step: u32,
    start: Instant,
    interval: Duration,
    count: u64,
}

/// One pair's counters for the current step.
struct PairStats {
    step: u32,
    written: u64,
    accepted: HashSet<u64>,
    /// msg_ids answered `sent`, with when, until their `delivered` receipt comes.
    awaiting_receipt: HashMap<String, Instant>,
    /// `sent` → `delivered` receipt, in µs: how far the stored side (the receiver's ack
    /// made durable and marked) trails acceptance. One entry per receipt.
    receipt_hist: Histogram<u64>,
    rejected: u64,
    first_error: Option<String>,
    /// seq → msg_id of what the receiver got.
    seen: HashMap<u64, String>,
    duplicates: u64,
    repeated: u64,
    hist: Histogram<u64>,
    /// Second of sending (since [`epoch`]) → (slow deliveries, the slowest in µs).
    slow: BTreeMap<u64, (u64, u64)>,
    last_delivery: Option<Instant>,
    ended: Option<String>,
}

impl PairStats {
    fn new() -> PairStats {
        PairStats {
            step: 0,
            written: 0,
            accepted: HashSet::new(),
            awaiting_receipt: HashMap::new(),
            receipt_hist: report::histogram(),
            rejected: 0,
            first_error: None,
            seen: HashMap::new(),
            duplicates: 0,
            repeated: 0,
            hist: report::histogram(),
            slow: BTreeMap::new(),
            last_delivery: None,
            ended: None,
        }
    }

    fn reset(&mut self, step: u32) {
        let ended = self.ended.take();
        *self = PairStats::new();
        self.step = step;
        self.ended = ended;
    }
}

struct Pair {
    orders: mpsc::UnboundedSender<Order>,
    stats: Arc<Mutex<PairStats>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Connected pairs, ready to be given steps of load.
pub struct Fleet {
    pairs: Vec<Pair>,
    body_size: usize,
    watched: Vec<Target>,
    target: String,
    next_step: u32,
}

/// Counters of a step over all pairs, read while it runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    written: u64,
    accepted: u64,
    rejected: u64,
    delivered: u64,
    receipts: u64,
}

/// What one step of load found.
pub struct Step {
    pub report: report::Report,
    pub latency: Latency,
    /// `sent` → `delivered` receipt, when the server sends receipts.
    pub receipts: Option<Receipts>,
}

/// How the receipts of a step came.
pub struct Receipts {
    /// Messages accepted (`sent`) whose `delivered` receipt never came.
    pub missing: u64,
    pub latency: Latency,
}

impl Fleet {
    /// Connects `accounts.len() / 2` pairs (sender `2i`, receiver `2i + 1`), each session past
    /// its start (`backlog_done`) before any load: until then the server may not have
    /// announced the session (the stack announces it after the pipeline settles, up to 2 s),
    /// so a message to it takes the store's path, and its latency would be the connect's.
    pub async fn connect(api: &Api, accounts: &[Account], body_size: usize) -> Result<Fleet> {
        let url = api.ws_url();
        let bar = report::bar(accounts.len() as u64, "sessions");
        let sessions: Vec<Session> = futures::stream::iter(accounts.iter().enumerate())
            .map(|(i, account)| {
                let bar = bar.clone();
                let source = source(i, &url);
                async move {
                    let mut session = api
                        .connect(account, source)
                        .await
                        .with_context(|| format!("connecting {}", account.username))?;
                    session
                        .until_backlog_done()
                        .await
                        .with_context(|| format!("starting {}'s session", account.username))?;
                    bar.inc(1);
                    anyhow::Ok(session)
                }
            })
            .buffered(CONNECT_CONCURRENCY)
            .try_collect()
            .await?;
        bar.finish_and_clear();
        let run = crate::chat::run_tag();
        let mut sessions = sessions.into_iter();
        let mut pairs = Vec::new();
        for couple in accounts.chunks_exact(2) {
            let (sender, receiver) = (&couple[0], &couple[1]);
            let (send_session, receive_session) = (
                sessions.next().expect("a session per account"),
                sessions.next().expect("a session per account"),
            );
            pairs.push(Pair::start(
                &run,
                body_size,
                sender.peer(),
                receiver.peer(),
                send_session,
                receive_session,
            ));
        }
        Ok(Fleet {
            pairs,
            body_size,
            watched: procs::targets(api.server_port()),
            target: api.base().to_string(),
            next_step: 1,
        })
    }

    /// Waits (up to `limit`) until the server's processes and backends are idle; see
    /// [`procs::until_quiet`].
    pub async fn until_quiet(&self, limit: Duration) -> (Duration, f64) {
        procs::until_quiet(&self.watched, limit).await
    }

    /// The server under load.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Offers `rate` messages per second, spread over the pairs, for `duration`, then waits
    /// until everything accepted has arrived (or nothing has moved for [`DRAIN_PATIENCE`]).
    pub async fn step(&mut self, rate: f64, duration: Duration) -> Step {
        let step = self.next_step;
        self.next_step += 1;
        let per_pair = rate / self.pairs.len() as f64;
        let count = (per_pair * duration.as_secs_f64()).round().max(1.0) as u64;
        let interval = Duration::from_secs_f64(1.0 / per_pair);
        let start = Instant::now() + Duration::from_millis(100);
        for pair in &self.pairs {
            pair.stats.lock().expect("stats lock").reset(step);
        }
        let watch = procs::Watch::start(&self.watched);
        for pair in &self.pairs {
            // Each pair starts at its own phase of the interval: no lockstep bursts.
            let phase = interval.mul_f64(rand::random::<f64>());
            let _ = pair.orders.send(Order {
                step,
                start: start + phase,
                interval,
                count,
            });
        }
        let total = count * self.pairs.len() as u64;
        let bar = report::bar(total, &format!("{rate:.0}/s"));
        let mut last = Totals::default();
        let mut moved = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.totals();
            bar.set_position(now.delivered);
            let finished = now.written == total
                && now.accepted + now.rejected == now.written
                && now.delivered >= now.accepted;
            if finished || self.ended().is_some() {
                break;
            }
            if now != last {
                last = now;
                moved = Instant::now();
            } else if moved.elapsed() > DRAIN_PATIENCE {
                break;
            }
        }
        bar.finish_and_clear();
        let settling = Instant::now();
        let (mut now, mut moved) = (self.totals(), Instant::now());
        while now.receipts < now.accepted && moved.elapsed() < SETTLE_QUIET {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let later = self.totals();
            if later.receipts != now.receipts {
                moved = Instant::now();
            }
            now = later;
        }
        let mut step = self.summarise(rate, duration, start, watch.finish());
        step.report.detail("receipts", now.receipts);
        if let Some(receipts) = &step.receipts {
            step.report.detail("receipt_ms", receipts.latency);
        }
        step.report
            .detail("settle_s", procs::round3(settling.elapsed().as_secs_f64()));
        step
    }

    /// The counters of every pair added up.
    fn totals(&self) -> Totals {
        self.pairs.iter().fold(Totals::default(), |t, pair| {
            let s = pair.stats.lock().expect("stats lock");
            Totals {
                written: t.written + s.written,
                accepted: t.accepted + s.accepted.len() as u64,
                rejected: t.rejected + s.rejected,
                delivered: t.delivered + s.seen.len() as u64,
                receipts: t.receipts + s.receipt_hist.len(),
            }
        })
    }

    fn ended(&self) -> Option<String> {
        self.pairs
            .iter()
            .find_map(|p| p.stats.lock().expect("stats lock").ended.clone())
    }

    fn summarise(
        &self,
        rate: f64,
        duration: Duration,
        start: Instant,
        processes: BTreeMap<String, Usage>,
    ) -> Step {
        let mut hist = report::histogram();
        let mut receipt_hist = report::histogram();
        let mut report = report::Report::new("throughput", &self.target);
        let (mut accepted, mut rejected, mut repeated) = (0, 0, 0);
        let mut last_delivery = start;
        let mut first_error = None;
        let mut slow = BTreeMap::<u64, (u64, u64)>::new();
        for pair in &self.pairs {
            let s = pair.stats.lock().expect("stats lock");
            hist.add(&s.hist)
                .expect("histograms with the same bounds add");
            receipt_hist
                .add(&s.receipt_hist)
                .expect("histograms with the same bounds add");
            for (second, (count, slowest)) in &s.slow {
                let (c, m) = slow.entry(*second).or_default();
                *c += count;
                *m = (*m).max(*slowest);
            }
            report.sent += s.written;
            report.delivered += s.seen.len() as u64;
            report.lost += s
                .accepted
                .iter()
                .filter(|seq| !s.seen.contains_key(seq))
                .count() as u64;
            report.duplicates += s.duplicates;
            accepted += s.accepted.len() as u64;
            rejected += s.rejected;
            repeated += s.repeated;
            if let Some(at) = s.last_delivery {
                last_delivery = last_delivery.max(at);
            }
            first_error = first_error.or(s.first_error.clone());
        }
        let took = last_delivery.saturating_duration_since(start).as_secs_f64();
        report.throughput_msgs_s = if took > 0.0 {
            (report.delivered as f64 / took).round()
        } else {
            0.0
        };
        let latency = Latency::of(&hist);
        report.latency_ms = Some(latency);
        report.processes = processes;
        report.detail("offered_msgs_s", rate.round());
        report.detail("duration_s", duration.as_secs_f64());
        report.detail("pairs", self.pairs.len());
        report.detail("body_bytes", self.body_size);
        report.detail("accepted", accepted);
        report.detail("repeated_frames", repeated);
        report.detail("slow", slow_seconds(&slow, start));
        if rejected > 0 {
            report.problems.push(format!(
                "{rejected} sends refused ({})",
                first_error.unwrap_or_default()
            ));
        }
        let unanswered = report.sent.saturating_sub(accepted + rejected);
        if unanswered > 0 {
            report
                .problems
                .push(format!("{unanswered} sends never answered"));
        }
        if let Some(ended) = self.ended() {
            report.problems.push(ended);
        }
        // A server that sends no receipts at all (the bare relay) is not judged on them.
        let receipts = (!receipt_hist.is_empty()).then(|| Receipts {
            missing: accepted.saturating_sub(receipt_hist.len()),
            latency: Latency::of(&receipt_hist),
        });
        Step {
            report,
            latency,
            receipts,
        }
    }
}

/// The seconds of a step in which deliveries took [`SLOW`] or more, the slowest first: when
/// (seconds since the step's start, by send time), how many, and the slowest in ms.
fn slow_seconds(slow: &BTreeMap<u64, (u64, u64)>, start: Instant) -> Vec<serde_json::Value> {
    let start_s = start.saturating_duration_since(epoch()).as_secs_f64();
    let mut seconds: Vec<_> = slow.iter().collect();
    seconds.sort_by_key(|(_, (_, slowest))| std::cmp::Reverse(*slowest));
    seconds
        .into_iter()
        .take(SLOW_LISTED)
        .map(|(second, (count, slowest))| {
            serde_json::json!({
                "at_s": (*second as f64 - start_s).max(0.0).floor(),
                "messages": count,
                "max_ms": procs::round3(*slowest as f64 / 1000.0),
            })
        })
        .collect()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for pair in &self.pairs {
            for task in &pair.tasks {
                task.abort();
            }
        }
    }
}

impl Pair {
    fn start(
        run: &str,
        body_size: usize,
        from: Peer,
        to: Peer,
        sender: Session,
        receiver: Session,
    ) -> Pair {
        let stats = Arc::new(Mutex::new(PairStats::new()));
        let (orders, orders_rx) = mpsc::unbounded_channel();
        let (writer, reader) = sender.split();
        let (ack_writer, receive_reader) = receiver.split();
        let tasks = vec![
            tokio::spawn(send(
                run.to_owned(),
                body_size,
                to,
                writer,
                orders_rx,
                stats.clone(),
            )),
            tokio::spawn(answers(run.to_owned(), reader, stats.clone())),
            tokio::spawn(receive(
                run.to_owned(),
                from,
                ack_writer,
                receive_reader,
                stats.clone(),
            )),
        ];
        Pair {
            orders,
            stats,
            tasks,
        }
    }
}

fn end(stats: &Mutex<PairStats>, why: String) {
    let mut s = stats.lock().expect("stats lock");
    s.ended.get_or_insert(why);
}

async fn send(
    run: String,
    body_size: usize,
    to: Peer,
    mut writer: Writer,
    mut orders: mpsc::UnboundedReceiver<Order>,
    stats: Arc<Mutex<PairStats>>,
) {
    while let Some(order) = orders.recv().await {
        for seq in 0..order.count {
            let at = order.start + order.interval.mul_f64(seq as f64);
            tokio::time::sleep_until(at.into()).await;
            let late = Instant::now().saturating_duration_since(at);
            let body = body(&run, order.step, seq, at + late.min(TIMER_SLACK), body_size);
            let client_id = format!("{run}-{}-{seq}", order.step);
            if let Err(e) = writer.send(&to, &client_id, &body).await {
                return end(&stats, format!("a sender's session failed: {e:#}"));
            }
            stats.lock().expect("stats lock").written += 1;
        }
    }
}

/// The sender's side: `sent` and `error` answers.
async fn answers(run: String, mut reader: Reader, stats: Arc<Mutex<PairStats>>) {
    loop {
        let event = match reader.next().await {
            Ok(Some(event)) => event,
            Ok(None) => return end(&stats, "the server closed a sender's session".into()),
            Err(e) => return end(&stats, format!("a sender's session failed: {e:#}")),
        };
        let mut s = stats.lock().expect("stats lock");
        match event {
            Event::Sent { client_id, msg_id } => {
                if let Some(seq) = seq_of(&run, s.step, &client_id) {
                    s.accepted.insert(seq);
                    s.awaiting_receipt.insert(msg_id, Instant::now());
                }
            }
            Event::Receipt { msg_id, status } if status == "delivered" => {
                if let Some(at) = s.awaiting_receipt.remove(&msg_id) {
                    s.receipt_hist.saturating_record(micros_since(at));
                }
            }
            Event::Error {
                code,
                client_id: Some(id),
            } if seq_of(&run, s.step, &id).is_some() => {
                s.rejected += 1;
                s.first_error.get_or_insert(code);
            }
            _ => {}
        }
    }
}

fn seq_of(run: &str, step: u32, client_id: &str) -> Option<u64> {
    let rest = client_id.strip_prefix(run)?.strip_prefix('-')?;
    let (s, seq) = rest.split_once('-')?;
    (s.parse::<u32>().ok()? == step).then_some(())?;
    seq.parse().ok()
}

/// The receiver's side: messages from its sender, acked in batches.
async fn receive(
    run: String,
    from: Peer,
    mut writer: Writer,
    mut reader: Reader,
    stats: Arc<Mutex<PairStats>>,
) {
    let mut unacked: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(ACK_EVERY);
    loop {
        tokio::select! {
            event = reader.next() => {
                let event = match event {
                    Ok(Some(event)) => event,
                    Ok(None) => return end(&stats, "the server closed a receiver's session".into()),
                    Err(e) => return end(&stats, format!("a receiver's session failed: {e:#}")),
                };
                if let Event::Message { msg_id, from: f, body } = event {
                    unacked.push(msg_id.clone());
                    if f == from {
                        record(&run, &body, msg_id, &stats);
                    }
                }
                if unacked.len() < ACK_BATCH {
                    continue;
                }
            }
            _ = tick.tick() => {
                if unacked.is_empty() {
                    continue;
                }
            }
        }
        for chunk in unacked.chunks(MAX_ACK_IDS) {
            if let Err(e) = writer.ack(chunk).await {
                return end(&stats, format!("a receiver's session failed: {e:#}"));
            }
        }
        unacked.clear();
    }
}

fn record(run: &str, body: &str, msg_id: String, stats: &Mutex<PairStats>) {
    let Some(stamp) = parse_body(run, body) else {
        return;
    };
    let mut s = stats.lock().expect("stats lock");
    if stamp.step != s.step {
        return;
    }
    match s.seen.get(&stamp.seq) {
        Some(first) if *first == msg_id => s.repeated += 1,
        Some(_) => s.duplicates += 1,
        None => {
            let micros = micros_since(stamp.at);
            s.hist.saturating_record(micros);
            if micros >= SLOW.as_micros() as u64 {
                let second = stamp.at.saturating_duration_since(epoch()).as_secs();
                let (count, slowest) = s.slow.entry(second).or_default();
                *count += 1;
                *slowest = (*slowest).max(micros);
            }
            s.seen.insert(stamp.seq, msg_id);
            s.last_delivery = Some(Instant::now());
        }
    }
}
