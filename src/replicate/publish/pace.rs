//! Flow control for the publisher (see [`crate::replicate::flow`]): a message goes to a shard only
//! while the estimated end of its stream stays within what the slowest live node can still read.
//! Invariant: the stream's end is estimated as what is known for sure (acks, this node's
//! position) plus the sends whose ack has not been awaited yet; an ack, awaited, stops counting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Publisher;
use crate::replicate::lock;

/// What the publisher needs to pace itself (see [`crate::replicate::flow`]).
pub struct Pacing {
    pub flow: Arc<crate::replicate::flow::Flow>,
    /// Per shard (index shard − 1): this node's last applied sequence.
    pub applied: Arc<[AtomicU64]>,
    /// Per shard: sends whose ack is not awaited yet (module header). Counting all sends stayed too
    /// high after an ack flagged duplicate (nothing added), holding publishing back forever.
    pub(super) unacked: Vec<AtomicU64>,
    /// Since when publishing has been held back (for one log line per episode).
    held_since: Mutex<Option<Instant>>,
}

impl Pacing {
    pub fn new(flow: Arc<crate::replicate::flow::Flow>, applied: Arc<[AtomicU64]>) -> Pacing {
        let unacked = applied.iter().map(|_| AtomicU64::new(0)).collect();
        Pacing {
            flow,
            applied,
            unacked,
            held_since: Mutex::new(None),
        }
    }
}

impl Publisher {
    /// Waits until a position report arrives or a short while passed; false on shutdown.
    pub(super) async fn wait_for_pace(&self, shutdown: &CancellationToken) -> bool {
        let Some(p) = &self.pacing else {
            return !shutdown.is_cancelled();
        };
        self.metrics.publish_paced.inc();
        {
            let mut since = lock(&p.held_since);
            match *since {
                None => {
                    *since = Some(Instant::now());
                    let now = crate::clock::unix_ms();
                    self.health
                        .update_catchup(|c| c.publish_held_since_ms = Some(now));
                }
                Some(t) if t.elapsed() >= Duration::from_secs(2) => {
                    let ends = self.stream_ends();
                    let slow: Vec<String> = p
                        .flow
                        .view(&ends)
                        .into_iter()
                        .filter(|v| v.counted)
                        .map(|v| format!("{} at {:?}", v.node_id, v.positions))
                        .collect();
                    tracing::info!(streams_end = ?ends, peers = ?slow,
                        "Publishing is paced to the slowest live node (the stream would otherwise discard changes it has not read)");
                    *since = Some(Instant::now() + Duration::from_secs(28));
                }
                Some(_) => {}
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = p.flow.changed.notified() => true,
            _ = tokio::time::sleep(Duration::from_millis(50)) => true,
        }
    }

    /// Per shard: the stream's end as far as this node knows.
    fn stream_ends(&self) -> Vec<u64> {
        let Some(p) = &self.pacing else {
            return Vec::new();
        };
        let acked = lock(&self.acked);
        (0..p.unacked.len())
            .map(|i| {
                let shard = i as u64 + 1;
                acked
                    .get(&shard)
                    .copied()
                    .unwrap_or(0)
                    .max(p.applied[i].load(Ordering::Relaxed))
                    + p.unacked[i].load(Ordering::Relaxed)
            })
            .collect()
    }

    /// Whether flow control lets a message go to `shard` now; if so, counts it as sent.
    pub(super) fn may_send(&self, shard: u64) -> bool {
        let Some(p) = &self.pacing else {
            return true;
        };
        let i = shard as usize - 1;
        let Some(end) = self.stream_ends().get(i).copied() else {
            return true;
        };
        if !p.flow.allows(i, end + 1, end) {
            return false;
        }
        p.unacked[i].fetch_add(1, Ordering::Relaxed);
        if lock(&p.held_since).take().is_some() {
            self.health
                .update_catchup(|c| c.publish_held_since_ms = None);
        }
        true
    }

    /// One awaited ack: no longer counted as unacknowledged for flow control.
    pub(super) fn acked_one<T>(&self, shard: u64, ack: T) -> T {
        if let Some(p) = &self.pacing
            && let Some(n) = p.unacked.get(shard as usize - 1)
        {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
        ack
    }
}
