//! The running node: one cheap-clone [`Node`] handle that every subsystem receives, built by
//! [`setup`] and run by [`run`] (design §5.1, corrosion's shape).
//!
//! - [`setup::setup`]: lock and open the database, install capture, start or reach the broker,
//!   connect, check the streams and the node-id lease → a [`Node`] plus what its subsystems own.
//!   Failures here are start-up errors: exit 1, or exit 2 for conflicts an operator must resolve
//!   ([`StartError`]).
//! - [`run::run`]: one `spawn_*` line per subsystem into one task set; the first subsystem that
//!   ends on its own — with an error or not — is the node's failure (one fatal path); then drain
//!   under a deadline and stop the broker.
//! - `snapshots`: the snapshot store and scheduler, wired for [`run::run`].
//! - `watchdog`: stops the node when its database file is deleted or replaced, and ends a
//!   generation when the schema drifts.
//!
//! Invariants:
//! - One root [`CancellationToken`]; every subsystem watches it (or a token derived from it).
//! - Nothing outlives [`run::run`]: tasks are joined or aborted, the apply thread joined, the
//!   embedded broker stopped, the database lock released last.

use std::sync::Arc;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::HealthState;
use crate::metrics::Metrics;

pub mod run;
pub mod setup;
mod snapshots;
mod watchdog;

/// Start-up refusals that a restart cannot fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cluster disagrees with this node's configuration or identity.
    #[error("{0}")]
    Conflict(String),
}

/// What a running node reports to the outside: metrics and the health endpoint's state.
#[derive(Clone)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<HealthState>,
}

/// The handle every subsystem gets: settings, identity, NATS, observers, the root token.
#[derive(Clone)]
pub struct Node(Arc<Inner>);

/// What [`Node`] holds.
pub struct Inner {
    pub settings: Arc<Settings>,
    /// This database's identity (in every message id we publish).
    pub identity: String,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub observers: Observers,
    /// Cancelled on shutdown or on the first fatal failure.
    pub root: CancellationToken,
}

impl std::ops::Deref for Node {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Node {
    /// Builds the handle.
    pub fn new(inner: Inner) -> Node {
        Node(Arc::new(inner))
    }

    /// A handle for one generation of subsystems (see [`run::run`]): the same node, with a
    /// token of its own that the node's root token cancels too.
    pub fn generation(&self) -> Node {
        Node::new(Inner {
            settings: Arc::clone(&self.settings),
            identity: self.identity.clone(),
            client: self.client.clone(),
            js: self.js.clone(),
            observers: self.observers.clone(),
            root: self.root.child_token(),
        })
    }

    /// The shard stream names, index shard − 1.
    pub fn streams(&self) -> Vec<String> {
        (1..=self.settings.replication.shards)
            .map(|shard| self.settings.stream_name(shard))
            .collect()
    }
}
