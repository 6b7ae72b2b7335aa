//! End-to-end tests: the three services on the real NATS, Redis and MariaDB, driven through
//! real WebSocket and HTTP clients. One binary, one module per capability; every test starts
//! its own deployment (`chat_tests::TestEnv`) in its own namespace and database.

mod abuse;
mod api;
mod backlog;
mod bench;
mod browser;
mod errors;
mod faults;
mod history;
mod messaging;
mod ops;
mod presence;
mod scale;
mod tls;
mod tracing;
mod upgrade;
