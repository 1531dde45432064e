//! harmonylite: leaderless SQLite replication over NATS JetStream, a drop-in Rust port of Go
//! HarmonyLite (wire, config and file formats are byte-compatible; see `design.md`).
//!
//! # Layout
//! - [`cli`]: Go-style flags, normalised before clap parses them.
//! - [`config`]: the TOML file layer with Go's defaults, validated into [`config::Settings`].
//! - [`logging`]: console or JSON lines, `node_id` on every line.
//! - [`clock`]: the one reader of the wall clock (unix seconds, milliseconds, nanoseconds).
//! - [`cbor`], [`wire`]: the CBOR event codec, shard hash, stream names, zstd.
//! - [`seqmap`]: the atomic `{stream: last applied seq}` state file.
//! - [`db`]: SQLite connection policy, schema discovery and hash, triggers, change log, applier,
//!   and following the application's DDL ([`db::ddl`]).
//! - [`registry`]: the cluster schema registry and the `-schema-status[-cluster]` reports.
//! - [`stream`]: NATS connection, shard streams, pipelined publish, ordered consumers.
//! - [`replicate`]: the publisher (change log → JetStream), the consumers and the apply thread
//!   (JetStream → SQLite), catch-up from snapshots, flow control.
//! - [`snapshot`]: save, verify and store snapshots; leader election; when to save.
//! - [`metrics`], [`health`]: Prometheus series and the health endpoint, fed from in-memory state.
//! - [`profiling`]: `-pprof` CPU profiles (protobuf and flame graph).
//! - [`systemd`]: `Type=notify` readiness.
//! - [`handle`]: the cheap-clone [`handle::Node`] every subsystem receives.
//! - [`node`]: the running node — setup, one `spawn_*` per subsystem, supervision (one fatal
//!   path) and drain.
//! - [`app`]: the program's modes (daemon with its HTTP servers, `-cleanup`, `-save-snapshot`,
//!   `-schema-status[-cluster]`).

pub mod app;
pub mod cbor;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod handle;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod profiling;
pub mod registry;
pub mod replicate;
pub mod retry;
pub mod seqmap;
pub mod snapshot;
pub mod stream;
pub mod systemd;
pub mod wire;

/// Lower-case hex of `bytes` (how SHA-256 sums are written: schema hashes, snapshot metadata).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An error and all its causes, `outer: inner: innermost`, for log lines (a bare `%e` drops the
/// cause, which is usually the part that says what went wrong).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
