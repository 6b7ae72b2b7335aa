//! The WebSocket itself: buffer sizes, and the writer that owns a socket's sending half.
//!
//! Public so that the benchmark's bare relay (`chat-bench relay`) runs with exactly these
//! settings and this writer: it is the yardstick the gateway is measured against.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use chat_proto::limits::MAX_FRAME_BYTES;
use futures::SinkExt;
use futures::stream::SplitSink;

/// Bytes read from a socket at a time, allocated up front for every connection. tungstenite's
/// default (128 KiB) would be most of an idle connection's memory; clients' frames are a few
/// hundred bytes, and a larger one grows the buffer to its size.
const READ_BUFFER: usize = 512;
/// Frames are gathered up to about this many bytes before they are written (and always
/// written once the queue behind them is empty): frames that are ready together go out in
/// one system call. The buffer keeps the capacity it grew to (as it did with frames written
/// one by one, when it grew to the largest frame), so it is kept small.
const WRITE_BUFFER: usize = 4096;

/// A socket's outbound queue, bounded to `capacity` frames: what the writer (`write_loop`)
/// sends. flume's queue allocates nothing until frames are queued and grows only as they
/// wait; tokio's allocates 32 slots up front, 1.6 KiB of every idle connection.
pub fn queue(capacity: usize) -> (flume::Sender<Message>, flume::Receiver<Message>) {
    flume::bounded(capacity)
}

/// The socket settings of every connection: PROTOCOL's 64 KiB frame limit and small buffers.
pub fn configure(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
}

/// Writes the frames of `rx` to `sink` until either ends or a close frame has been sent.
/// Whatever is queued when the writer wakes is written together, flushed once.
pub async fn write_loop(mut sink: SplitSink<WebSocket, Message>, rx: flume::Receiver<Message>) {
    'socket: while let Ok(mut msg) = rx.recv_async().await {
        loop {
            let closing = matches!(msg, Message::Close(_));
            // After a close frame nothing more is written; `close` below flushes it.
            if sink.feed(msg).await.is_err() || closing {
                break 'socket;
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}
