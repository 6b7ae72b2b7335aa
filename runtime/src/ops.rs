//! What an operator sees of a service: `/healthz` (the process answers), `/readyz` (its
//! backends answer) and `/metrics` (Prometheus text of every `metrics::` counter, gauge and
//! histogram the process records).
//!
//! The gateway mounts [`routes`] on its public port; the router and store serve them on a
//! small port of their own ([`serve`]).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// How long one backend may take to answer a readiness probe before it counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Latency buckets (seconds) of every `*_seconds` histogram: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One backend's answer to a readiness probe.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub backend: &'static str,
    pub ok: bool,
}

/// Probes a service's backends; `/readyz` is 200 only when every check is ok.
pub type Readiness = Arc<dyn Fn() -> BoxFuture<'static, Vec<Check>> + Send + Sync>;

/// A [`Readiness`] that runs `checks` on a clone of `state`.
pub fn readiness<S, F, Fut>(state: S, checks: F) -> Readiness
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Check>> + Send + 'static,
{
    Arc::new(move || Box::pin(checks(state.clone())))
}

/// Whether NATS is connected now (the client reconnects by itself; this says if it has).
pub fn nats_check(client: &async_nats::Client) -> Check {
    Check {
        backend: "nats",
        ok: client.connection_state() == async_nats::connection::State::Connected,
    }
}

/// Runs `probe` with [`PROBE_TIMEOUT`]: a backend that hangs is not ready either.
pub async fn probe<E>(backend: &'static str, probe: impl Future<Output = Result<(), E>>) -> Check {
    let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(())));
    Check { backend, ok }
}

/// The process-wide Prometheus recorder, installed on first use. One per process: services
/// that share a process (the in-process tests) share their metrics.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed; then that one gets the metrics.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        // Histograms drain their samples on render; upkeep keeps memory flat between scrapes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
        }
        handle
    })
}

/// `/healthz`, `/readyz` and `/metrics`, probing backends with `ready`.
pub fn routes<S>(ready: Readiness) -> Router<S> {
    metrics();
    Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(ready)
}

async fn readyz(State(ready): State<Readiness>) -> Response {
    let checks = ready().await;
    let body: serde_json::Map<String, serde_json::Value> = checks
        .iter()
        .map(|c| {
            (
                c.backend.to_owned(),
                (if c.ok { "ok" } else { "down" }).into(),
            )
        })
        .collect();
    if checks.iter().all(|c| c.ok) {
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        let down: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.backend).collect();
        let error = serde_json::json!({
            "error": {
                "code": chat_proto::ErrorCode::NotReady,
                "message": format!("not ready: {} unreachable", down.join(", ")),
            },
            "checks": body,
        });
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(error)).into_response()
    }
}

async fn render() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
        .into_response()
}

/// Awaits `fut`, recording how long it took in the histogram `metric` labelled `op`
/// (backend call latency: `chat_redis_seconds`, `chat_db_seconds`).
pub async fn timed<F: Future>(metric: &'static str, op: &'static str, fut: F) -> F::Output {
    let start = std::time::Instant::now();
    let out = fut.await;
    metrics::histogram!(metric, "op" => op).record(start.elapsed().as_secs_f64());
    out
}

/// Publishes how far `consumer` of `stream` is behind (messages not yet delivered plus those
/// delivered and not yet acked) as the gauge `chat_consumer_lag{consumer}`, every few
/// seconds until `cancel` fires.
async fn report_lag(
    stream: async_nats::jetstream::stream::Stream,
    consumer: &'static str,
    cancel: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        // Not waited for when stopping: with NATS away it would take its full timeout.
        let info = tokio::select! {
            () = cancel.cancelled() => return,
            info = stream.consumer_info(consumer) => info,
        };
        if let Ok(info) = info {
            let lag = info.num_pending + info.num_ack_pending as u64;
            metrics::gauge!("chat_consumer_lag", "consumer" => consumer).set(lag as f64);
        }
    }
}

/// Starts the two operations tasks of a service that consumes a stream: the operations port
/// on `listener` ("ops") and the lag gauge of its `consumer` of `stream` ("lag").
pub fn spawn_for_consumer(
    tasks: &mut crate::tasks::Tasks,
    listener: tokio::net::TcpListener,
    ready: Readiness,
    stream: async_nats::jetstream::stream::Stream,
    consumer: &'static str,
    cancel: &CancellationToken,
) {
    tasks.spawn("ops", serve(listener, ready, cancel.clone()));
    tasks.spawn("lag", report_lag(stream, consumer, cancel.clone()));
}

/// Serves [`routes`] on `listener` until `cancel` fires.
async fn serve(listener: tokio::net::TcpListener, ready: Readiness, cancel: CancellationToken) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "operations port: /healthz /readyz /metrics");
    let app: Router = routes(ready);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "operations port failed");
    }
}

/// The address a listener got, for logs and tests.
pub fn local_addr(listener: &tokio::net::TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound TCP listener has an address")
}
