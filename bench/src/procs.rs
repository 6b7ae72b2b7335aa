//! The CPU time and memory of the processes under load, read from `/proc` when this tool can
//! see them (same machine): the service processes by name, the backends, and whatever listens
//! on the port the tool talks to (the gateway, or the bare relay).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use procfs::process::{FDTarget, Process};
use serde::Serialize;
use tokio::task::JoinHandle;

/// Process names (`/proc/<pid>/comm`) worth watching.
const WATCHED: [&str; 6] = [
    "chat-gateway",
    "chat-router",
    "chat-store",
    "nats-server",
    "redis-server",
    "mariadbd",
];

/// How often resident memory is sampled for its peak.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Target {
    pub label: String,
    pub pid: i32,
}

/// The watched processes running now, labelled by name (with the pid when a name runs more
/// than once), the process listening on `port` if it is none of them, and this tool itself
/// (`load-tool`: it shares the machine with what it measures).
pub fn targets(port: Option<u16>) -> Vec<Target> {
    let mut found: Vec<(String, i32)> = vec![("load-tool".to_owned(), std::process::id() as i32)];
    if let Ok(all) = procfs::process::all_processes() {
        for process in all.flatten() {
            if let Ok(stat) = process.stat()
                && WATCHED.contains(&stat.comm.as_str())
            {
                found.push((stat.comm, process.pid));
            }
        }
    }
    if let Some(pid) = port.and_then(listener_pid)
        && !found.iter().any(|(_, p)| *p == pid)
    {
        let name = Process::new(pid)
            .and_then(|p| p.stat())
            .map(|s| s.comm)
            .unwrap_or_else(|_| "server".to_owned());
        found.push((name, pid));
    }
    let mut targets: Vec<Target> = found
        .iter()
        .map(|(name, pid)| {
            let several = found.iter().filter(|(n, _)| n == name).count() > 1;
            Target {
                label: if several {
                    format!("{name}[{pid}]")
                } else {
                    name.clone()
                },
                pid: *pid,
            }
        })
        .collect();
    targets.sort_by(|a, b| a.label.cmp(&b.label));
    targets
}

/// The process with a listening TCP socket on `port`, if this tool may see it.
pub fn listener_pid(port: u16) -> Option<i32> {
    const LISTEN: u8 = 0x0A;
    let mut inodes: Vec<u64> = Vec::new();
    for table in [procfs::net::tcp(), procfs::net::tcp6()] {
        for entry in table.into_iter().flatten() {
            if entry.local_address.port() == port && entry.state as u8 == LISTEN {
                inodes.push(entry.inode);
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    procfs::process::all_processes()
        .ok()?
        .flatten()
        .find(|process| {
            process.fd().is_ok_and(|fds| {
                fds.flatten().any(
                    |fd| matches!(fd.target, FDTarget::Socket(inode) if inodes.contains(&inode)),
                )
            })
        })
        .map(|process| process.pid)
}

/// Resident memory of `pid` now, in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let status = Process::new(pid).ok()?.status().ok()?;
    status.vmrss.map(|kib| kib * 1024)
}

/// CPU seconds (user + system) `pid` has used so far.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = Process::new(pid).ok()?.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// What one process used over a measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
}

/// Watches processes from [`Watch::start`] to [`Watch::finish`].
pub struct Watch {
    targets: Vec<(Target, f64, Arc<AtomicU64>)>,
    sampler: JoinHandle<()>,
}

impl Watch {
    pub fn start(targets: &[Target]) -> Watch {
        let targets: Vec<(Target, f64, Arc<AtomicU64>)> = targets
            .iter()
            .filter_map(|t| {
                let cpu = cpu_seconds(t.pid)?;
                let peak = Arc::new(AtomicU64::new(rss_bytes(t.pid).unwrap_or(0)));
                Some((t.clone(), cpu, peak))
            })
            .collect();
        let sampled: Vec<(i32, Arc<AtomicU64>)> = targets
            .iter()
            .map(|(t, _, peak)| (t.pid, peak.clone()))
            .collect();
        let sampler = tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            loop {
                every.tick().await;
                for (pid, peak) in &sampled {
                    if let Some(rss) = rss_bytes(*pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                }
            }
        });
        Watch { targets, sampler }
    }

    pub fn finish(self) -> BTreeMap<String, Usage> {
        self.sampler.abort();
        self.targets
            .into_iter()
            .filter_map(|(t, cpu_before, peak)| {
                let cpu = cpu_seconds(t.pid)? - cpu_before;
                let usage = Usage {
                    cpu_seconds: round3(cpu),
                    peak_rss_mib: round3(peak.load(Ordering::Relaxed) as f64 / 1048576.0),
                };
                Some((t.label, usage))
            })
            .collect()
    }
}

/// Below this many cores used together, the watched processes count as quiet: idle, they use
/// well under 1 % of a core (pings, heartbeats, NATS's and MariaDB's housekeeping).
const QUIET_CORES: f64 = 0.05;

/// Waits, up to `limit`, until the watched processes other than this tool use less than
/// [`QUIET_CORES`] together over a second: what earlier load left them to do (a store
/// catching up, MariaDB purging old row versions, NATS expiring messages) is done. Returns
/// how long it waited and the cores used over the last second.
pub async fn until_quiet(targets: &[Target], limit: Duration) -> (Duration, f64) {
    const WINDOW: Duration = Duration::from_secs(1);
    let pids: Vec<i32> = targets
        .iter()
        .filter(|t| t.label != "load-tool")
        .map(|t| t.pid)
        .collect();
    let used = || pids.iter().filter_map(|pid| cpu_seconds(*pid)).sum::<f64>();
    let start = tokio::time::Instant::now();
    loop {
        let before = used();
        // A measurement window, not a wait for an event: CPU time is only known afterwards.
        tokio::time::sleep(WINDOW).await;
        let cores = (used() - before) / WINDOW.as_secs_f64();
        if cores < QUIET_CORES || start.elapsed() >= limit {
            return (start.elapsed(), cores);
        }
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
