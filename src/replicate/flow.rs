//! Flow control (design §3.11): publishers never run a stream further ahead of the slowest live
//! node than it holds; Go has none, so its nodes silently lose what the stream discards unread.
//!
//! Every applying node reports its applied positions in KV bucket [`BUCKET`] (key `node-<id>`)
//! after each advance (at most every [`REPORT_MIN_GAP`]), at least every [`REPORT_EVERY`];
//! publishers watch it, and [`Flow::allows`] keeps each send within every *counting* peer's window.
//!
//! Invariants:
//! - A peer counts only while alive (a report seen within [`STALE`]) and either keeping up (within
//!   the window of the stream's end) or advancing (within [`STALLED`]): a stopped, hung or stuck
//!   node holds publishers back for seconds at most, then recovers by snapshot.
//! - A publisher always counts itself (when it applies), so its node reads everything even when no
//!   other counts: when every consumer stalled at once (server restart, starved machine),
//!   publishers ran past what anyone had read, all waiting for a snapshot in vain.
//! - Staleness is judged by when *this* node saw a report change, never by other machines' clocks.
//! - Without the bucket (old server) nothing is throttled: snapshot recovery is the guarantee.
//! - Each of n live nodes gets a window of `max_messages / (n + 1)`, so that all bursting at once
//!   (backlogs after an outage; each knows only its own unacknowledged messages) still fit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::replicate::lock;

/// KV bucket of applied positions (ours; Go HarmonyLite has none).
pub const BUCKET: &str = "harmonylite-positions";
/// Longest time between two reports of a node.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Shortest time between two reports (while applying quickly).
pub const REPORT_MIN_GAP: Duration = Duration::from_millis(10);
/// A peer whose report did not change for this long is gone.
pub const STALE: Duration = Duration::from_secs(5);
/// A peer behind the window that did not advance for this long stops holding publishers back.
pub const STALLED: Duration = Duration::from_secs(3);
/// Entries of nodes that stopped reporting disappear after this.
const ENTRY_MAX_AGE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub node_id: u64,
    /// Stream name → last applied sequence.
    pub positions: HashMap<String, u64>,
    /// Increases with every report, so an unchanged position still shows the node is alive.
    pub beat: u64,
}

/// What this node knows of one peer.
#[derive(Debug, Clone)]
struct Peer {
    /// Per stream (index shard − 1).
    positions: Vec<u64>,
    seen: Instant,
    /// Per stream: when the position last increased.
    advanced: Vec<Instant>,
}

pub use crate::health::PeerView;

/// The cluster's applied positions as seen here, and the publishing window.
pub struct Flow {
    streams: Vec<String>,
    /// This node: its own position comes straight from its apply thread, not through the bucket.
    self_id: u64,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Per stream: the stream's `max_messages` (0 = unknown or unlimited: no throttling).
    limits: Vec<AtomicU64>,
    /// Woken whenever a report arrives.
    pub changed: Notify,
    /// Woken by the apply thread after it advanced (the reporter sends a report).
    pub advanced: Notify,
}

impl Flow {
    /// `max_messages`: the configured limit, until [`Flow::set_limit`] has the streams' own
    /// (unpaced at start, one backlog overran a 16-message stream and every node waited in vain).
    pub fn new(streams: Vec<String>, self_id: u64, max_messages: i64) -> Arc<Flow> {
        let limits = streams
            .iter()
            .map(|_| AtomicU64::new(max_messages.max(0) as u64))
            .collect();
        Arc::new(Flow {
            streams,
            self_id,
            peers: Mutex::new(HashMap::new()),
            limits,
            changed: Notify::new(),
            advanced: Notify::new(),
        })
    }

    /// The window (module header). Half the stream each let three publishers overshoot it by half:
    /// all nodes lost the same messages, the snapshot leader too (recovering, it saves none).
    fn window_among(&self, stream: usize, peers: &HashMap<u64, Peer>, now: Instant) -> u64 {
        let limit = self
            .limits
            .get(stream)
            .map_or(0, |l| l.load(Ordering::Relaxed));
        if limit == 0 {
            return 0;
        }
        // This node (it asks because it publishes) and every other node heard from lately.
        let live = 1 + peers
            .iter()
            .filter(|(id, p)| **id != self.self_id && now.duration_since(p.seen) < STALE)
            .count() as u64;
        (limit / (live + 1)).max(1)
    }

    /// Records a stream's `max_messages` (≤ 0: unlimited).
    pub fn set_limit(&self, stream: usize, max_messages: i64) {
        if let Some(l) = self.limits.get(stream) {
            l.store(max_messages.max(0) as u64, Ordering::Relaxed);
        }
    }

    /// Whether a message that would get sequence `seq` in `stream` (ending near `end`) may go now.
    pub fn allows(&self, stream: usize, seq: u64, end: u64) -> bool {
        match self.slowest_and_window(stream, end, Instant::now()) {
            (_, 0) | (None, _) => true,
            (Some(slowest), window) => seq <= slowest + window,
        }
    }

    /// The lowest position among the peers that count for `stream` (see the module header).
    #[cfg(test)]
    fn slowest(&self, stream: usize, end: u64, now: Instant) -> Option<u64> {
        self.slowest_and_window(stream, end, now).0
    }

    /// The lowest position among the peers that count for `stream` (see the module header) and
    /// the window, read under one lock (asked before every send).
    fn slowest_and_window(&self, stream: usize, end: u64, now: Instant) -> (Option<u64>, u64) {
        let peers = lock(&self.peers);
        let window = self.window_among(stream, &peers, now);
        let slowest = peers
            .iter()
            .filter(|(id, p)| **id == self.self_id || counts(p, stream, end, window, now))
            .filter_map(|(_, p)| p.positions.get(stream).copied())
            .min();
        (slowest, window)
    }

    /// Takes a report in (from the watcher); our own are ignored ([`Flow::record_local`]).
    fn record(&self, report: &Report) {
        if report.node_id == self.self_id {
            return;
        }
        let positions: Vec<u64> = self
            .streams
            .iter()
            .map(|s| report.positions.get(s).copied().unwrap_or(0))
            .collect();
        self.record_positions(report.node_id, positions);
    }

    /// Records this node's applied positions as they advance (no round trip through the bucket).
    pub fn record_local(&self, positions: &[AtomicU64]) {
        let positions = positions
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect();
        self.record_positions(self.self_id, positions);
    }

    fn record_positions(&self, node_id: u64, positions: Vec<u64>) {
        let now = Instant::now();
        let mut peers = lock(&self.peers);
        let peer = peers.entry(node_id).or_insert_with(|| Peer {
            positions: Vec::new(),
            seen: now,
            advanced: vec![now; positions.len()],
        });
        for (i, &pos) in positions.iter().enumerate() {
            if pos > peer.positions.get(i).copied().unwrap_or(0) {
                peer.advanced[i] = now;
            }
        }
        peer.positions = positions;
        peer.seen = now;
        drop(peers);
        self.changed.notify_waiters();
    }

    fn forget(&self, node_id: u64) {
        lock(&self.peers).remove(&node_id);
        self.changed.notify_waiters();
    }

    /// Every known peer (health endpoint, lag metrics); `ends`: per stream, its end as known here.
    pub fn view(&self, ends: &[u64]) -> Vec<PeerView> {
        let now = Instant::now();
        let peers = lock(&self.peers);
        let windows: Vec<u64> = (0..self.streams.len())
            .map(|s| self.window_among(s, &peers, now))
            .collect();
        let mut out: Vec<PeerView> = peers
            .iter()
            .map(|(&node_id, p)| PeerView {
                node_id,
                positions: p.positions.clone(),
                last_report_ms_ago: now.duration_since(p.seen).as_millis() as u64,
                counted: (0..self.streams.len())
                    .any(|s| counts(p, s, ends.get(s).copied().unwrap_or(0), windows[s], now)),
            })
            .collect();
        out.sort_by_key(|p| p.node_id);
        out
    }
}

/// Whether `peer` holds publishers of `stream` back (module header).
fn counts(peer: &Peer, stream: usize, end: u64, window: u64, now: Instant) -> bool {
    if now.duration_since(peer.seen) >= STALE {
        return false;
    }
    let pos = peer.positions.get(stream).copied().unwrap_or(0);
    let keeping_up = pos + window > end;
    let advancing = peer
        .advanced
        .get(stream)
        .is_some_and(|&t| now.duration_since(t) < STALLED);
    keeping_up || advancing
}

/// Opens (or creates) the positions bucket. `None` when the server cannot provide it.
pub async fn bucket(js: &jetstream::Context, settings: &Settings) -> Option<kv::Store> {
    crate::stream::open_or_create(js, config(settings))
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "Cannot create the positions bucket; publishing is not paced to the slowest node"))
        .ok()
}

fn config(settings: &Settings) -> kv::Config {
    kv::Config {
        bucket: BUCKET.to_owned(),
        description: "harmonylite: applied stream positions per node (flow control)".to_owned(),
        history: 1,
        max_age: ENTRY_MAX_AGE,
        storage: jetstream::stream::StorageType::File,
        num_replicas: settings.replication.replicas.max(1),
        ..Default::default()
    }
}

/// Reports this node's applied positions until shutdown (module header); after a failed put it
/// creates the bucket again if JetStream lost it.
pub async fn report(
    (js, store): (jetstream::Context, kv::Store),
    flow: Arc<Flow>,
    settings: Arc<Settings>,
    positions: Arc<[AtomicU64]>,
    shutdown: CancellationToken,
) {
    let node_id = settings.node_id;
    let key = format!("node-{node_id}");
    let mut beat = 0u64;
    let mut failing = false;
    loop {
        beat += 1;
        let report = Report {
            node_id,
            positions: flow
                .streams
                .iter()
                .zip(positions.iter())
                .map(|(s, p)| (s.clone(), p.load(Ordering::Relaxed)))
                .collect(),
            beat,
        };
        flow.record_local(&positions);
        let encoded = serde_json::to_vec(&report)
            .inspect_err(|e| tracing::error!(error = %e, "Cannot encode the position report"));
        let Ok(body) = encoded else { return };
        let put = store.put(&key, body.into()).await;
        match &put {
            Ok(_) if failing => tracing::info!("Position reports work again"),
            Err(e) if !failing => {
                tracing::warn!(error = %e, "Cannot report applied positions; retrying")
            }
            _ => {}
        }
        failing = put.is_err();
        if failing {
            let _ = crate::stream::open_or_create(&js, config(&settings)).await;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = flow.advanced.notified() => {}
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
        if !crate::retry::pause(&shutdown, REPORT_MIN_GAP).await {
            break;
        }
    }
    // A node that stops on purpose stops holding others back at once.
    let _ = store.delete(&key).await;
}

/// Follows the bucket until shutdown, recreating the watch after errors.
pub async fn watch(store: kv::Store, flow: Arc<Flow>, shutdown: CancellationToken) {
    let mut backoff = crate::retry::Backoff::default();
    loop {
        let watched = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            w = store.watch_all() => w,
        };
        match watched {
            Ok(mut entries) => loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    n = entries.next() => n,
                };
                match next {
                    Some(Ok(entry)) => {
                        backoff.reset();
                        let Some(id) = entry
                            .key
                            .strip_prefix("node-")
                            .and_then(|k| k.parse::<u64>().ok())
                        else {
                            continue;
                        };
                        match entry.operation {
                            kv::Operation::Put => {
                                match serde_json::from_slice::<Report>(&entry.value) {
                                    Ok(r) if r.node_id == id => flow.record(&r),
                                    Ok(_) | Err(_) => {
                                        tracing::debug!(key = %entry.key, "ignoring a malformed position report")
                                    }
                                }
                            }
                            kv::Operation::Delete | kv::Operation::Purge => flow.forget(id),
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "position watch failed; restarting it");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::debug!(error = %e, "cannot watch positions; retrying"),
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// Every second: `peer_lag` (behind the furthest known position) and the health endpoint's peers.
pub async fn observe(
    flow: Arc<Flow>,
    observers: crate::handle::Observers,
    shutdown: CancellationToken,
) {
    let peer_lag = &observers.metrics.peer_lag;
    loop {
        let ends: Vec<u64> = {
            let peers = lock(&flow.peers);
            (0..flow.streams.len())
                .map(|s| {
                    peers
                        .values()
                        .filter_map(|p| p.positions.get(s).copied())
                        .max()
                        .unwrap_or(0)
                })
                .collect()
        };
        let view = flow.view(&ends);
        peer_lag.reset();
        for peer in &view {
            for (s, &pos) in peer.positions.iter().enumerate() {
                peer_lag
                    .with_label_values(&[peer.node_id.to_string(), (s + 1).to_string()])
                    .set(ends.get(s).copied().unwrap_or(0).saturating_sub(pos) as i64);
            }
        }
        observers.health.update_catchup(|c| c.peers = view);
        if !crate::retry::pause(&shutdown, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// Keeps the streams' `max_messages` current and says once when one differs from `max_entries`
/// (an existing stream keeps its creation limit unless `update_existing = true`).
pub async fn follow_limits(
    js: jetstream::Context,
    flow: Arc<Flow>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    let mut warned = vec![false; flow.streams.len()];
    loop {
        for (i, name) in flow.streams.iter().enumerate() {
            if let Ok(stream) = js.get_stream(name).await {
                let have = stream.cached_info().config.max_messages;
                flow.set_limit(i, have);
                let want = settings.replication.max_entries;
                if have != want && !warned[i] {
                    warned[i] = true;
                    tracing::warn!(stream = %name, stream_max_entries = have, configured = want,
                        "Stream keeps max_entries = {have} from its creation; replication_log.max_entries = {want} \
                         takes effect only with replication_log.update_existing = true");
                }
            }
        }
        if !crate::retry::pause(&shutdown, Duration::from_secs(10)).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Flow {
        /// How many messages a stream may run ahead of its slowest counting peer (0: unlimited).
        fn window(&self, stream: usize) -> u64 {
            let peers = lock(&self.peers);
            self.window_among(stream, &peers, Instant::now())
        }
    }

    fn report(node: u64, pos: u64) -> Report {
        Report {
            node_id: node,
            positions: [("s-1".to_owned(), pos)].into_iter().collect(),
            beat: 1,
        }
    }

    #[test]
    fn window_is_shared_among_live_nodes_and_follows_the_slowest_peer() {
        let flow = Flow::new(vec!["s-1".into()], 99, 0);
        assert!(flow.allows(0, 10_000, 0), "no limit known: unthrottled");
        flow.set_limit(0, 1200);
        assert_eq!(flow.window(0), 600, "alone: half the stream");
        assert!(flow.allows(0, 10_000, 9_999), "no peers: unthrottled");
        flow.record(&report(1, 100));
        flow.record(&report(2, 900));
        assert_eq!(flow.window(0), 300, "us and two peers: a quarter each");
        assert!(flow.allows(0, 400, 399));
        assert!(!flow.allows(0, 401, 400));
        flow.forget(1);
        assert_eq!(flow.window(0), 400);
        assert!(flow.allows(0, 1300, 1299));
        // Our own reports through the bucket are ignored; the local record counts.
        flow.record(&report(99, 0));
        assert!(flow.allows(0, 1300, 1299));
        let own = [AtomicU64::new(5)];
        flow.record_local(&own);
        assert!(flow.allows(0, 405, 404));
        assert!(!flow.allows(0, 406, 405));
    }

    /// Three nodes' publishers bursting at once, each knowing only its own unacknowledged
    /// messages and the same slowest position: together they stay within the stream.
    #[test]
    fn every_live_publisher_bursting_at_once_fits_in_the_stream() {
        let limit = 24u64;
        let flows: Vec<Arc<Flow>> = (1..=3)
            .map(|id| Flow::new(vec!["s-1".into()], id, 0))
            .collect();
        for (i, flow) in flows.iter().enumerate() {
            flow.set_limit(0, limit as i64);
            flow.record_local(&[AtomicU64::new(100)]);
            for other in (1..=3).filter(|&o| o != i as u64 + 1) {
                flow.record(&report(other, 100));
            }
        }
        let sent: u64 = flows
            .iter()
            .map(|flow| {
                // Each sees the stream end at the slowest position plus its own sends.
                let mut mine = 0;
                while flow.allows(0, 100 + mine + 1, 100 + mine) {
                    mine += 1;
                }
                mine
            })
            .sum();
        assert!(
            sent > 0 && sent <= limit,
            "{sent} messages past the slowest node"
        );
    }

    /// Right after a start, before the streams' limits are read or any peer reported: the
    /// configured limit and this node's own position already hold a backlog back.
    #[test]
    fn a_fresh_publisher_is_paced_before_it_hears_anything() {
        let flow = Flow::new(vec!["s-1".into()], 3, 16);
        flow.record_local(&[AtomicU64::new(40)]);
        // Alone it may use half the stream past its own position, no more.
        assert!(flow.allows(0, 48, 47));
        assert!(!flow.allows(0, 49, 48));
        // The stream moved on while this node was down: nothing goes until it has caught up.
        assert!(!flow.allows(0, 701, 700));
    }

    #[test]
    fn a_peer_that_is_gone_or_stuck_stops_counting() {
        let flow = Flow::new(vec!["s-1".into()], 99, 0);
        flow.set_limit(0, 16);
        flow.record(&report(1, 10));
        let now = Instant::now();
        assert_eq!(flow.slowest(0, 30, now), Some(10));
        // Behind and not advancing for STALLED: not counted, though still reporting.
        assert_eq!(flow.slowest(0, 30, now + STALLED), None);
        // Keeping up (the next message fits its window, 16 / 3): counted while it reports.
        assert_eq!(flow.slowest(0, 14, now + STALLED), Some(10));
        // Exactly at the window's edge it holds the next message back: stuck there, it stops
        // counting too (it used to count for good, holding publishers back forever).
        assert_eq!(flow.slowest(0, 15, now + STALLED), None);
        // No report for STALE: gone.
        assert_eq!(flow.slowest(0, 14, now + STALE), None);
    }

    /// When every consumer stalls at once, the publisher still paces to its own position.
    #[test]
    fn this_node_always_counts() {
        let flow = Flow::new(vec!["s-1".into()], 99, 0);
        flow.set_limit(0, 16);
        flow.record(&report(1, 10));
        flow.record_local(&[AtomicU64::new(12)]);
        let later = Instant::now() + STALE + STALLED;
        assert_eq!(
            flow.slowest(0, 40, later),
            Some(12),
            "peer 1 gone, we count"
        );
    }
}
