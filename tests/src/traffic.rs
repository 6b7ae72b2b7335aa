//! Traffic among many users, and the checker of what PROTOCOL.md promises about it.
//!
//! [`Traffic::run`] drives one WebSocket client per user: each sends its share of the
//! messages at a steady pace (retrying with the same `client_id` on `internal` or after a
//! reconnect), reads everything pushed to it, acks what it receives, and reconnects when its
//! socket closes. [`Report::check`] then asserts: every message that got `sent` reached its
//! recipient exactly once after de-dup by `msg_id`, one `msg_id` per `client_id`, each
//! sender's messages in `msg_id` order as sent, and both users' history holds exactly those.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{Client, TestEnv, User, eventually};

/// One planned message.
#[derive(Debug, Clone)]
struct Planned {
    seq: usize,
    from: usize,
    to: usize,
}

/// What every client saw, shared by the client tasks.
#[derive(Default)]
struct Seen {
    /// client_id → msg_id answered by `sent`, per sender index.
    sent: HashMap<String, String>,
    /// Every (recipient index, msg_id) received, and how often.
    received: HashMap<(usize, String), usize>,
    /// How often each message (by seq) was sent: more than once after an `internal` answer
    /// or a lost connection.
    attempts: HashMap<usize, usize>,
}

/// How far a run has got, for a fault to strike at a chosen moment.
pub struct Progress(Arc<Mutex<Seen>>);

impl Progress {
    /// Waits until `n` messages have been answered `sent`.
    pub async fn until_sent(&self, n: usize) {
        eventually(&format!("{n} messages sent"), || async {
            (self.0.lock().unwrap().sent.len() >= n).then_some(())
        })
        .await;
    }

    /// How many messages have been answered `sent` so far.
    pub fn sent(&self) -> usize {
        self.0.lock().unwrap().sent.len()
    }
}

pub struct Traffic {
    pub users: Vec<User>,
    /// Messages in all.
    pub messages: usize,
    /// Pause between two sends of one user.
    pub pace: Duration,
}

/// What the run saw, to check.
pub struct Report {
    users: Vec<User>,
    plan: Vec<Planned>,
    seen: Arc<Mutex<Seen>>,
    pub reconnects: usize,
    pub duplicates: usize,
}

fn body(seq: usize) -> String {
    format!("message {seq}")
}

impl Traffic {
    /// Plans `messages` among `users` (each to a few others), connects them round-robin to
    /// the gateways at `ws_urls`, runs the traffic while `during` (given the progress) runs,
    /// and waits until every `sent` message reached its recipient.
    pub async fn run<F, Fut, T>(self, ws_urls: Vec<String>, during: F) -> (Report, T)
    where
        F: FnOnce(Progress) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let n = self.users.len();
        assert!(n >= 2);
        let plan: Vec<Planned> = (0..self.messages)
            .map(|seq| {
                let from = seq % n;
                let to = (from + 1 + (seq / n) % (n - 1)) % n;
                Planned { seq, from, to }
            })
            .collect();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut tasks = Vec::new();
        for (i, user) in self.users.iter().enumerate() {
            let mine: Vec<Planned> = plan.iter().filter(|p| p.from == i).cloned().collect();
            let expected: usize = plan.iter().filter(|p| p.to == i).count();
            let urls = ws_urls.clone();
            let ids: Vec<i64> = self.users.iter().map(|u| u.id).collect();
            tasks.push(tokio::spawn(client_loop(
                i,
                user.clone(),
                urls,
                ids,
                mine,
                expected,
                self.pace,
                seen.clone(),
            )));
        }
        let outcome = during(Progress(seen.clone())).await;
        let mut reconnects = 0;
        let mut duplicates = 0;
        for t in tasks {
            let (r, d) = t.await.expect("client task");
            reconnects += r;
            duplicates += d;
        }
        let report = Report {
            users: self.users,
            plan,
            seen,
            reconnects,
            duplicates,
        };
        (report, outcome)
    }
}

/// The longest a run may take, beyond its planned sending time, before everything must
/// have arrived.
const SETTLE: Duration = Duration::from_secs(40);

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    me: usize,
    user: User,
    urls: Vec<String>,
    ids: Vec<i64>,
    mine: Vec<Planned>,
    expected: usize,
    pace: Duration,
    seen: Arc<Mutex<Seen>>,
) -> (usize, usize) {
    let index: HashMap<i64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let deadline = Instant::now() + pace * mine.len() as u32 + SETTLE;
    let mut reconnects = 0;
    let mut duplicates = 0;
    let mut next = 0; // next of `mine` never sent on this connection
    let mut confirmed: HashSet<usize> = HashSet::new();
    let mut got: HashSet<String> = HashSet::new();
    let mut attempt = 0usize;
    'connection: loop {
        assert!(
            Instant::now() < deadline,
            "user {me}: traffic did not settle within {SETTLE:?}"
        );
        let url = &urls[(me + attempt) % urls.len()];
        attempt += 1;
        let mut client = match Client::connect(url, &user).await {
            Ok(c) => c,
            Err(_) => {
                reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Resend whatever had no `sent` yet, with the same client_id.
        next = next.min(
            mine.iter()
                .position(|p| !confirmed.contains(&p.seq))
                .unwrap_or(mine.len()),
        );
        let mut due = Instant::now();
        loop {
            if Instant::now() > deadline {
                panic!(
                    "user {me}: {} of {} confirmed, {} of {expected} received",
                    confirmed.len(),
                    mine.len(),
                    got.len()
                );
            }
            if next < mine.len() && Instant::now() >= due {
                let p = &mine[next];
                if !confirmed.contains(&p.seq) {
                    let frame = json!({"type": "send", "client_id": format!("k{}", p.seq), "to": ids[p.to], "body": body(p.seq)});
                    *seen.lock().unwrap().attempts.entry(p.seq).or_default() += 1;
                    if client.try_send_json(frame).await.is_err() {
                        reconnects += 1;
                        continue 'connection;
                    }
                }
                next += 1;
                due = Instant::now() + pace;
            }
            let done = confirmed.len() == mine.len() && got.len() == expected;
            if done {
                client.close().await;
                return (reconnects, duplicates);
            }
            let frame = match client.recv(Duration::from_millis(5)).await {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(_) => {
                    reconnects += 1;
                    continue 'connection;
                }
            };
            match frame["type"].as_str() {
                Some("sent") => {
                    let cid = frame["client_id"].as_str().unwrap_or_default();
                    let seq: usize = cid[1..].parse().expect("our client ids");
                    let msg_id = frame["msg_id"].as_str().unwrap().to_owned();
                    let mut s = seen.lock().unwrap();
                    if let Some(before) = s.sent.insert(cid.to_owned(), msg_id.clone()) {
                        assert_eq!(before, msg_id, "{cid} got two msg_ids");
                    }
                    confirmed.insert(seq);
                }
                Some("error") => {
                    assert_eq!(frame["code"], "internal", "user {me}: {frame}");
                    // Not accepted: send it again from the first unconfirmed one.
                    next = mine
                        .iter()
                        .position(|p| !confirmed.contains(&p.seq))
                        .unwrap_or(mine.len());
                }
                Some("message") => {
                    let msg_id = frame["msg_id"].as_str().unwrap().to_owned();
                    let from = index[&frame["from"].as_i64().unwrap()];
                    if from == me {
                        // A copy of my own message, as sent from "another device" (this
                        // user's connection that died before its `sent`).
                        continue;
                    }
                    *seen
                        .lock()
                        .unwrap()
                        .received
                        .entry((me, msg_id.clone()))
                        .or_default() += 1;
                    if got.insert(msg_id.clone()) {
                        let ack = json!({"type": "ack", "msg_ids": [msg_id.clone()]});
                        if client.try_send_json(ack).await.is_err() {
                            reconnects += 1;
                            continue 'connection;
                        }
                    } else {
                        duplicates += 1;
                    }
                }
                _ => {}
            }
        }
    }
}

impl Report {
    /// Asserts the delivery guarantees over everything the run saw.
    pub async fn check(&self, env: &TestEnv) {
        eprintln!(
            "traffic: {} messages, {} duplicate pushes dropped, {} reconnects",
            self.plan.len(),
            self.duplicates,
            self.reconnects
        );
        let per_pair = {
            let seen = self.seen.lock().unwrap();
            assert_eq!(seen.sent.len(), self.plan.len(), "every message got `sent`");
            // Every sent message reached its recipient (with duplicates dropped), and nothing else did.
            let mut per_pair: BTreeMap<(usize, usize), Vec<(String, usize)>> = BTreeMap::new();
            for p in &self.plan {
                let msg_id = &seen.sent[&format!("k{}", p.seq)];
                assert!(
                    seen.received.contains_key(&(p.to, msg_id.clone())),
                    "message {} lost",
                    p.seq
                );
                per_pair
                    .entry((p.from.min(p.to), p.from.max(p.to)))
                    .or_default()
                    .push((msg_id.clone(), p.seq));
            }
            let delivered: HashSet<&String> = seen.received.keys().map(|(_, id)| id).collect();
            assert_eq!(
                delivered.len(),
                self.plan.len(),
                "no message that was not sent"
            );
            // Each sender's messages sent once: msg_id order is send order (a retry is a later
            // send, so it may rightly come after messages sent meanwhile).
            for from in 0..self.users.len() {
                let mut mine: Vec<(&String, usize)> = self
                    .plan
                    .iter()
                    .filter(|p| p.from == from && seen.attempts.get(&p.seq) == Some(&1))
                    .map(|p| (&seen.sent[&format!("k{}", p.seq)], p.seq))
                    .collect();
                mine.sort();
                assert!(
                    mine.windows(2).all(|w| w[0].1 < w[1].1),
                    "user {from}: msg_id order is send order"
                );
            }
            per_pair
        };
        // History of each conversation holds exactly its messages, once, in msg_id order.
        for ((lo, hi), mut want) in per_pair {
            want.sort();
            let want: Vec<String> = want.into_iter().map(|(id, _)| id).collect();
            let user = &self.users[lo];
            let peer = self.users[hi].id;
            let stored: Vec<String> = eventually("history complete", || async {
                let mut all: Vec<Value> = Vec::new();
                let mut before: Option<String> = None;
                loop {
                    let mut path = format!("/api/v1/conversations/{peer}/messages?limit=200");
                    if let Some(b) = &before {
                        path.push_str(&format!("&before={b}"));
                    }
                    let (_, page) = env.get(user, &path).await;
                    let msgs = page["messages"].as_array()?.clone();
                    before = msgs
                        .first()
                        .map(|m| m["msg_id"].as_str().unwrap().to_owned());
                    all.splice(0..0, msgs);
                    if page["has_more"] != true {
                        break;
                    }
                }
                let ids: Vec<String> = all
                    .iter()
                    .map(|m| m["msg_id"].as_str().unwrap().to_owned())
                    .collect();
                (ids.len() >= want.len()).then_some(ids)
            })
            .await;
            assert_eq!(stored, want, "history of {lo}-{hi}");
        }
    }
}
