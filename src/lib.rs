//! harmonylite: leaderless SQLite replication over NATS JetStream, a drop-in Rust port of Go
//! HarmonyLite (wire, config and file formats are byte-compatible; see `design.md`).
//!
//! Layout (each module's header says more): front end [`cli`], [`config`], [`app`] (the modes);
//! formats [`cbor`], [`wire`], [`seqmap`]; SQLite [`db`]; NATS [`stream`]; [`replicate`]
//! (publish, apply, catch-up, flow control); [`snapshot`]; [`registry`]; the running node
//! [`handle`], [`node`]; observability [`logging`], [`metrics`], [`health`], [`profiling`],
//! [`systemd`]; helpers [`clock`] (the one wall-clock reader), [`retry`].

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
