//! What a scenario found: one JSON object (`--json`) or a table for people.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::procs::{Usage, round3};

/// Latencies are recorded in microseconds, from 1 µs to a minute, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("these bounds are valid")
}

/// Percentiles of a histogram of microseconds, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(hist: &Histogram<u64>) -> Latency {
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Latency {
            p50: ms(hist.value_at_quantile(0.50)),
            p90: ms(hist.value_at_quantile(0.90)),
            p99: ms(hist.value_at_quantile(0.99)),
            p999: ms(hist.value_at_quantile(0.999)),
            max: ms(hist.max()),
        }
    }
}

/// The result of one scenario (or one step of one).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub target: String,
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub throughput_msgs_s: f64,
    pub latency_ms: Option<Latency>,
    pub processes: BTreeMap<String, Usage>,
    /// What only this scenario measures.
    #[serde(flatten)]
    pub details: Map<String, Value>,
    /// Why the run does not count, if it does not (besides `lost` or `duplicates`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str, target: &str) -> Report {
        Report {
            scenario,
            target: target.to_owned(),
            sent: 0,
            delivered: 0,
            lost: 0,
            duplicates: 0,
            throughput_msgs_s: 0.0,
            latency_ms: None,
            processes: BTreeMap::new(),
            details: Map::new(),
            problems: Vec::new(),
        }
    }

    pub fn detail(&mut self, key: &str, value: impl Serialize) {
        self.details.insert(
            key.to_owned(),
            serde_json::to_value(value).expect("details serialise"),
        );
    }

    /// Adds another run's message counts to this one's (a scenario made of several runs).
    pub fn add_counts(&mut self, other: &Report) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
    }

    /// A run counts only if nothing was lost or shown twice and nothing else went wrong.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = self.problems.clone();
        if self.lost > 0 {
            failures.push(format!("{} messages lost", self.lost));
        }
        if self.duplicates > 0 {
            failures.push(format!("{} messages duplicated", self.duplicates));
        }
        failures
    }

    /// A table for people.
    pub fn print(&self) {
        println!("{} against {}", self.scenario, self.target);
        let mut rows: Vec<(String, String)> = vec![
            ("sent".into(), self.sent.to_string()),
            ("delivered".into(), self.delivered.to_string()),
            ("lost".into(), self.lost.to_string()),
            ("duplicates".into(), self.duplicates.to_string()),
            (
                "throughput".into(),
                format!("{:.0} msgs/s", self.throughput_msgs_s),
            ),
        ];
        if let Some(l) = self.latency_ms {
            rows.push((
                "latency ms".into(),
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    l.p50, l.p90, l.p99, l.p999, l.max
                ),
            ));
        }
        for (key, value) in &self.details {
            if key == "steps" {
                continue;
            }
            rows.push((key.replace('_', " "), compact(value)));
        }
        for (name, usage) in &self.processes {
            rows.push((
                name.clone(),
                format!(
                    "{:.2} CPU s, peak RSS {:.1} MiB",
                    usage.cpu_seconds, usage.peak_rss_mib
                ),
            ));
        }
        for problem in &self.problems {
            rows.push(("PROBLEM".into(), problem.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in rows {
            println!("  {key:<width$}  {value}");
        }
        if let Some(Value::Array(steps)) = self.details.get("steps") {
            println!("  steps:");
            println!(
                "    {:>9} {:>11} {:>8} {:>8} {:>8} {:>5}",
                "offered", "delivered/s", "p50 ms", "p99 ms", "p99.9 ms", "ok"
            );
            for step in steps {
                let l = &step["latency_ms"];
                println!(
                    "    {:>9} {:>11} {:>8} {:>8} {:>8} {:>5}",
                    step["offered_msgs_s"],
                    step["throughput_msgs_s"],
                    l["p50"],
                    l["p99"],
                    l["p999"],
                    step["within_target"]
                );
            }
        }
        println!();
    }
}

fn compact(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal, as in CI).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}
