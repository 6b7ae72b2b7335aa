//! The long-running tasks a service is made of, kept alive together.
//!
//! A service is a few loops: consuming a stream, answering requests, heartbeats, the operations
//! port. Each is meant to run until shutdown. If one ends sooner (it returned, or it panicked),
//! the process must not go on without it, answering `/readyz` while, say, no message is routed
//! any more: [`Tasks::run_until`] then stops the others and returns the error, and the service
//! exits non-zero so that its supervisor (compose's `restart`, Kubernetes) starts it again.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// A task that ended before shutdown was asked for.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("task `{0}` ended before shutdown")]
    Returned(&'static str),
    #[error("task `{0}` panicked: {1}")]
    Panicked(&'static str, String),
}

/// Named tasks that live until `cancel` fires; see the module's documentation.
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    cancel: CancellationToken,
}

impl Tasks {
    /// Tasks that stop when `cancel` fires; every task spawned must watch it.
    pub fn new(cancel: CancellationToken) -> Self {
        Tasks {
            set: JoinSet::new(),
            names: HashMap::new(),
            cancel,
        }
    }

    /// Starts `task`, named `name` in logs and errors.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Runs until `shutdown` resolves or a task ends, whichever is first; then fires the
    /// token, waits for every task to finish and returns the one that ended early, if any.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Ended> {
        let early = tokio::select! {
            () = shutdown => None,
            // An empty set has nothing to end: only `shutdown` is awaited then.
            Some(ended) = self.set.join_next_with_id() => Some(self.ended(ended)),
        };
        if let Some(e) = &early {
            tracing::error!(error = %e, "stopping the service");
        }
        self.cancel.cancel();
        while let Some(ended) = self.set.join_next_with_id().await {
            if let Ended::Panicked(name, why) = self.ended(ended) {
                tracing::error!(task = name, panic = why, "task panicked while stopping");
            }
        }
        early.map_or(Ok(()), Err)
    }

    fn ended(&self, result: Result<(Id, ()), JoinError>) -> Ended {
        let name = |id| self.names.get(&id).copied().unwrap_or("unnamed");
        match result {
            Ok((id, ())) => Ended::Returned(name(id)),
            Err(e) => {
                let name = name(e.id());
                match e.try_into_panic() {
                    Ok(panic) => Ended::Panicked(name, panic_message(panic.as_ref())),
                    Err(_) => Ended::Returned(name),
                }
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_is_named() {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        tasks.spawn("consume", cancel.clone().cancelled_owned());
        tasks.spawn("route", async { panic!("lost the stream") });
        let result = tasks.run_until(std::future::pending()).await;
        match result {
            Err(Ended::Panicked(name, why)) => {
                assert_eq!((name, why.as_str()), ("route", "lost the stream"));
            }
            other => panic!("expected the panic to end the run, got {other:?}"),
        }
        assert!(cancel.is_cancelled(), "the other tasks are told to stop");
    }

    #[tokio::test]
    async fn a_task_returning_early_ends_the_run() {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        tasks.spawn("ops", cancel.clone().cancelled_owned());
        tasks.spawn("heartbeat", async {});
        let result = tasks.run_until(std::future::pending()).await;
        assert!(
            matches!(result, Err(Ended::Returned("heartbeat"))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_every_task_and_is_no_error() {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(2);
        for name in ["consume", "serve"] {
            let cancel = cancel.clone();
            let done = done_tx.clone();
            tasks.spawn(name, async move {
                cancel.cancelled().await;
                // Work that finishes after the token fired is waited for.
                tokio::time::sleep(Duration::from_millis(20)).await;
                done.send(name).await.expect("the test listens");
            });
        }
        drop(done_tx);
        let (stop, shutdown) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(tasks.run_until(async {
            let _ = shutdown.await;
        }));
        stop.send(()).expect("the run waits for shutdown");
        run.await
            .expect("the run does not panic")
            .expect("no task ended early");
        let mut finished = Vec::new();
        while let Ok(name) = done_rx.try_recv() {
            finished.push(name);
        }
        finished.sort_unstable();
        assert_eq!(finished, ["consume", "serve"]);
    }
}
