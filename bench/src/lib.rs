//! The load tool's parts; `main.rs` is its command line.
//!
//! [`chat`] speaks the public contract (and, through [`xmpp`], XMPP over WebSocket), [`load`] runs open-loop pairs over it,
//! [`scenarios`] are what the command line offers, [`relay`] is the bare server the stack is
//! compared with, [`components`] times the raw backends, [`procs`] reads `/proc` for CPU and
//! memory and [`report`] prints the outcome.

pub mod chat;
pub mod components;
pub mod load;
pub mod procs;
pub mod relay;
pub mod report;
pub mod scenarios;
pub mod xmpp;
