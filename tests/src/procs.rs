//! Services as real processes (`chat-gateway`, `chat-router`, `chat-store` from
//! `target/debug`, built by `scripts/test` before the tests run), for tests that kill them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A service process and how to start it again.
pub struct Proc {
    bin: &'static str,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// A binary of this workspace next to the test binary (`target/<profile>/<bin>`).
pub fn bin_path(bin: &str) -> PathBuf {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(bin);
    assert!(
        path.exists(),
        "{} is missing: build the services first (`cargo build --bins`; scripts/test does)",
        path.display()
    );
    path
}

impl Proc {
    /// Starts `bin` with `env` and waits until it logs that it is serving.
    pub async fn start(bin: &'static str, env: Vec<(String, String)>) -> Proc {
        let mut p = Proc {
            bin,
            env,
            child: None,
        };
        p.spawn().await;
        p
    }

    async fn spawn(&mut self) {
        let show = std::env::var_os("TEST_LOG").is_some();
        let mut child = Command::new(bin_path(self.bin))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                if show {
                    "info"
                } else {
                    "warn,chat_gateway=info,chat_router=info,chat_store=info"
                },
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin));
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let bin = self.bin;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut ready = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("serving") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                } else if show || line.contains("ERROR") || line.contains(&format!("{bin}:")) {
                    eprintln!("[{bin}] {line}");
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(())) => {}
            _ => panic!("{} did not start serving", self.bin),
        }
        self.child = Some(child);
    }

    /// `kill -9`: no shutdown, no clean-up, whatever it was doing.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM, and wait for it to exit (SIGKILL after `grace`). Returns its exit status when
    /// it exited by itself within `grace`, `None` when it had to be killed.
    pub async fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                None
            }
        }
    }

    /// Starts it again with the same settings (after a kill).
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.spawn().await;
    }

    pub fn kill_now(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}
