//! The cheap-clone [`Node`] handle (corrosion's `Agent`). It lives here, below every subsystem,
//! so that they import it without reaching up into [`crate::node`], which builds and runs them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::seqmap::SeqMap;

/// What a running node reports to the outside: metrics and the health endpoint's state.
#[derive(Clone)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<HealthState>,
}

/// The handle every subsystem gets: settings, identity, NATS, observers, the root token.
#[derive(Clone)]
pub struct Node(Arc<Inner>);

#[derive(Clone)]
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
    pub fn new(inner: Inner) -> Node {
        Node(Arc::new(inner))
    }

    /// One generation's handle (see `node::run`): the same node with a child of the root token.
    pub fn generation(&self) -> Node {
        Node::new(Inner {
            root: self.root.child_token(),
            ..Inner::clone(self)
        })
    }

    /// The shard stream names, index shard − 1.
    pub fn streams(&self) -> Vec<String> {
        (1..=self.settings.replication.shards)
            .map(|shard| self.settings.stream_name(shard))
            .collect()
    }

    /// Per shard: the last applied sequence, as `seqmap` records it.
    pub fn positions(&self, seqmap: &SeqMap) -> Arc<[AtomicU64]> {
        self.streams()
            .iter()
            .map(|s| AtomicU64::new(seqmap.get(s)))
            .collect()
    }
}
