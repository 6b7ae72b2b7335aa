//! The gateway's Prometheus metrics, named in one place (`docs/operations.md` lists them).

use chat_proto::frame::ServerFrame;

/// A frame a client sent, by `type` (`invalid` when it could not be parsed).
pub(crate) fn frame_in(kind: &'static str) {
    metrics::counter!("chat_gateway_frames_in_total", "type" => kind).increment(1);
}

/// A frame queued for a client, by `type`; `error` frames also count by code.
pub(crate) fn frame_out(frame: &ServerFrame) {
    frame_out_kind(frame.kind());
    if let ServerFrame::Error { code, .. } = frame {
        metrics::counter!("chat_gateway_errors_total", "code" => code.as_str()).increment(1);
    }
}

/// A frame queued for a client, by `type`.
pub(crate) fn frame_out_kind(kind: &'static str) {
    metrics::counter!("chat_gateway_frames_out_total", "type" => kind).increment(1);
}

/// The static name of an event's `type` from NATS (bounded label values).
pub(crate) fn event_kind(kind: &str) -> &'static str {
    match kind {
        "message" => "message",
        "receipt" => "receipt",
        "presence" => "presence",
        "typing" => "typing",
        _ => "other",
    }
}

/// A message JetStream holds for the first time (`sent` with a new id).
pub(crate) fn accepted() {
    metrics::counter!("chat_gateway_messages_accepted_total").increment(1);
}

/// A live message pushed to a device of its recipient for the first time on that
/// connection: the end-to-end delivery latency since the gateway accepted it (`ts`).
pub(crate) fn delivered_live(accepted_ms: i64) {
    let seconds = (chat_proto::now_ms() - accepted_ms).max(0) as f64 / 1000.0;
    metrics::histogram!("chat_delivery_latency_seconds").record(seconds);
}

/// A message pushed from the backlog.
pub(crate) fn replayed() {
    metrics::counter!("chat_gateway_messages_replayed_total").increment(1);
}

/// A socket catching up from the backlog after NATS came back.
pub(crate) fn caught_up() {
    metrics::counter!("chat_gateway_catch_ups_total").increment(1);
}

/// Users' subscriptions the gateway's event connection holds (one per connected socket).
pub(crate) fn event_subscriptions(count: usize) {
    metrics::gauge!("chat_gateway_event_subscriptions").set(count as f64);
}

/// A socket whose events filled its queue: its subscription ended, and it reconnects.
pub(crate) fn event_overflow() {
    metrics::counter!("chat_gateway_event_overflows_total").increment(1);
}
