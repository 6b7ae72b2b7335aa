//! Logging and trace context.
//!
//! `tracing` is the one instrumentation API. An OpenTelemetry layer gives every span a W3C
//! trace and span id, so [`inject`] can put the current span's `traceparent` into NATS
//! headers and [`extract`] can make the receiving service's span its child: one trace per
//! message across gateway, router and store.
//!
//! Spans are exported over OTLP/HTTP when the standard variables ask for it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, with
//! `OTEL_EXPORTER_OTLP_PROTOCOL` `http/protobuf` (default) or `http/json`, and the `OTEL_BSP_*`
//! batch settings), under the service name given to [`init`]; with none set, nothing is sent.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The target of spans that are for the logs only, never part of a trace: a connection's
/// span, open for hours, would make one huge trace exported only at its end, and would keep
/// its OpenTelemetry data (~1 KiB) as long. Spans opened inside one start traces of their own.
pub const LOGS_ONLY: &str = "chat::logs_only";

/// Keeps the tracer provider alive; dropping it flushes and shuts it down.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global subscriber: `RUST_LOG` filtering (default `info`), human-readable logs
/// on stderr, and the OpenTelemetry layer. Call once, first thing in `main`.
pub fn init(service: &'static str) -> TelemetryGuard {
    install(service, true)
}

/// Like [`init`], with logs only when `logs` is set: trace context (ids, `traceparent`) works
/// either way. Tests call it with logs off unless asked for. A second call changes nothing.
pub fn install(service: &'static str, logs: bool) -> TelemetryGuard {
    let resource = Resource::builder().with_service_name(service).build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource);
    if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(e) => eprintln!("{service}: cannot export traces over OTLP: {e}"),
        }
    }
    let provider = provider.build();
    let tracer = provider.tracer(service);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = logs.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
    });
    // Busy/idle time and making the span the current OpenTelemetry context cost work on
    // every poll of an instrumented future: 7.8 %, then still 5.6 %, of the gateway's CPU at
    // 3,500 msgs/s (perf, docs/benchmarks.md). Neither is used: trace context is read from
    // the tracing span itself (`inject`, `extract`), not from OpenTelemetry's current context.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_threads(false)
        .with_filter(
            Targets::new()
                .with_default(LevelFilter::INFO)
                .with_target(LOGS_ONLY, LevelFilter::OFF),
        );
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    TelemetryGuard { provider }
}

/// Whether the environment asks for OTLP export (and does not switch the SDK off).
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let off = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none");
    !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator's string becomes the header value as it is, not a copy of it.
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's `traceparent` (and `tracestate`) into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Headers holding only the current span's trace context.
pub fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    inject(&mut h);
    h
}

/// Makes `span` a child of the trace context in `headers`, when they carry one.
pub fn extract(headers: Option<&HeaderMap>, span: &tracing::Span) {
    if let Some(h) = headers {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(h));
        let _ = span.set_parent(cx);
    }
}
