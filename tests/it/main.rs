//! Integration tests: one binary (ripgrep style), real nats-server processes on loopback.

mod support;

mod auth;
mod catchup;
mod cli;
mod convergence;
mod core;
mod docs;
mod e2e;
mod embedded;
mod failures;
mod observability;
mod operations;
mod schema;
mod stores;
mod systemd;
mod values;
