//! The health endpoint (`[health_check]`): Go HarmonyLite's JSON body, keys in Go's order, 200 if
//! healthy else 503 (upstream-behaviour §10); Corrosion-style thresholds also give 503 when
//! exceeded: `?max_lag_seconds=N` (last apply lag seen), `?max_pending=N` (unpublished changes).
//! Invariant: a request never touches NATS or SQLite, only [`HealthState`], which subsystems update
//! as they work: it answers instantly even when they are stuck. (Go derived both timestamps from
//! shard 1's stream, a NATS request per call; `last_published_event_timestamp` is here our last
//! acked publish, `last_replicated_event_timestamp` the stream time of the last event applied.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::clock;

/// Live facts the endpoint reports; cheap to update from any thread.
pub struct HealthState {
    pub node_id: u64,
    started: Instant,
    pub db_connected: AtomicBool,
    pub cdc_installed: AtomicBool,
    pub tables_tracked: AtomicU64,
    /// Set by the NATS client's connection events.
    pub nats_connected: AtomicBool,
    /// Unix nanoseconds; 0 = never.
    last_replicated_ns: AtomicI64,
    last_published_ns: AtomicI64,
    /// Last observed apply lag, microseconds.
    apply_lag_us: AtomicI64,
    /// Local changes not yet published (updated at every publisher scan).
    pub pending: AtomicI64,
    /// Bit i set while shard i+1's consumer cannot read its stream.
    consumers_down: AtomicU64,
    /// Set once a subsystem failed and the node is stopping.
    failed: AtomicBool,
    /// Unix ns of the last [`HealthState::pulse`], for `sleep_timeout` (upstream-behaviour §13).
    last_pulse_ns: AtomicI64,
    /// Catch-up facts (ours, appended after Go's keys).
    catchup: std::sync::Mutex<Catchup>,
}

/// One peer as the health endpoint shows it (filled in by `replicate::flow`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerView {
    pub node_id: u64,
    pub positions: Vec<u64>,
    pub last_report_ms_ago: u64,
    /// Whether it currently holds publishers back when behind.
    pub counted: bool,
}

/// What the health body says about snapshots, recovery and peers.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Catchup {
    /// Why the node is recovering from a snapshot (503 while set).
    pub recovering: Option<String>,
    pub snapshot_leader: bool,
    /// Unix ms of this node's last saved and restored snapshot (0 = never).
    pub last_snapshot_saved_ms: i64,
    pub last_snapshot_restored_ms: i64,
    /// The last snapshot failure (save, download or verification), if any since the last success.
    pub last_snapshot_error: Option<String>,
    /// Applied positions of the nodes this node knows (flow control).
    pub peers: Vec<PeerView>,
    /// This node's schema hash (what it sends as `sh`).
    pub schema_hash: String,
    /// Events waiting for this node's schema (they apply once the same migration runs here).
    pub schema_waiting_events: usize,
    /// Why applying is paused (503 while set): too many events wait for this node's schema.
    pub apply_paused: Option<String>,
    /// Unix ms since publishing has been held back (paced); 503 once held longer than
    /// `publish_held_limit_ms` (`[health_check] max_publish_held_seconds`; 0: never).
    pub publish_held_since_ms: Option<i64>,
    #[serde(skip)]
    pub publish_held_limit_ms: i64,
    /// Other nodes' changes kept in `__harmonylite__conflicts` since start (lost to local ones).
    pub conflicts: u64,
}

impl HealthState {
    /// A state for `node_id` with nothing up yet; uptime counts from now.
    pub fn new(node_id: u64) -> Arc<HealthState> {
        Arc::new(HealthState {
            node_id,
            started: Instant::now(),
            db_connected: AtomicBool::new(false),
            cdc_installed: AtomicBool::new(false),
            tables_tracked: AtomicU64::new(0),
            nats_connected: AtomicBool::new(false),
            last_replicated_ns: AtomicI64::new(0),
            last_published_ns: AtomicI64::new(0),
            apply_lag_us: AtomicI64::new(0),
            pending: AtomicI64::new(0),
            consumers_down: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            last_pulse_ns: AtomicI64::new(clock::unix_ns()),
            catchup: std::sync::Mutex::new(Catchup::default()),
        })
    }

    pub fn update_catchup(&self, f: impl FnOnce(&mut Catchup)) {
        f(&mut self.catchup.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn catchup(&self) -> Catchup {
        self.catchup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records an acknowledged publish (now).
    pub fn published_now(&self) {
        self.last_published_ns
            .store(clock::unix_ns(), Ordering::Relaxed);
    }

    /// Records activity: a local change consumed or a remote one applied.
    pub fn pulse(&self) {
        self.last_pulse_ns
            .store(clock::unix_ns(), Ordering::Relaxed);
    }

    /// Resolves once no pulse has been seen for `timeout`.
    pub async fn idle_for(&self, timeout: std::time::Duration) {
        loop {
            let idle_ns =
                (clock::unix_ns() - self.last_pulse_ns.load(Ordering::Relaxed)).max(0) as u64;
            let idle = std::time::Duration::from_nanos(idle_ns);
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }

    /// Records an applied event by its stream timestamp (unix ns) and the lag it had.
    pub fn applied(&self, stream_time_ns: i64, lag_us: i64) {
        self.pulse();
        self.last_replicated_ns
            .fetch_max(stream_time_ns, Ordering::Relaxed);
        self.apply_lag_us.store(lag_us.max(0), Ordering::Relaxed);
    }

    /// Marks shard `idx + 1`'s consumer as unable (or able again) to read its stream.
    pub fn set_consumer_down(&self, idx: usize, down: bool) {
        let bit = 1u64 << (idx % 64);
        if down {
            self.consumers_down.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.consumers_down.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Marks the node as failed (it is stopping because a subsystem could not go on).
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Healthy: Go's rule (database, NATS and capture all up), every consumer reading its stream,
    /// no subsystem failed, not recovering from a snapshot, not paused.
    pub fn healthy(&self) -> bool {
        let catchup = self.catchup();
        !self.failed.load(Ordering::Relaxed)
            && self.db_connected.load(Ordering::Relaxed)
            && self.nats_connected.load(Ordering::Relaxed)
            && self.cdc_installed.load(Ordering::Relaxed)
            && self.consumers_down.load(Ordering::Relaxed) == 0
            && catchup.recovering.is_none()
            && catchup.apply_paused.is_none()
            && catchup.publish_held_since_ms.is_none_or(|t| {
                let limit = catchup.publish_held_limit_ms;
                limit == 0 || clock::unix_ms() - t <= limit
            })
    }

    /// The body Go sends, keys in its order; `0001-01-01T00:00:00Z` for a time never seen.
    pub fn body(&self, healthy: bool) -> String {
        format!(
            "{{\"status\":\"{}\",\"node_id\":{},\"uptime_seconds\":{},\"db_connected\":{},\"nats_connected\":{},\
             \"cdc_installed\":{},\"tables_tracked\":{},\"last_replicated_event_timestamp\":\"{}\",\
             \"last_published_event_timestamp\":\"{}\",\"version\":\"{}\",{}}}\n",
            if healthy { "healthy" } else { "unhealthy" },
            self.node_id,
            self.started.elapsed().as_secs(),
            self.db_connected.load(Ordering::Relaxed),
            self.nats_connected.load(Ordering::Relaxed),
            self.cdc_installed.load(Ordering::Relaxed),
            self.tables_tracked.load(Ordering::Relaxed),
            rfc3339_nano(self.last_replicated_ns.load(Ordering::Relaxed)),
            rfc3339_nano(self.last_published_ns.load(Ordering::Relaxed)),
            env!("CARGO_PKG_VERSION"),
            self.catchup_fields(),
        )
    }

    /// Our keys after Go's: `"recovering":…,"snapshot_leader":…,…` (no braces).
    fn catchup_fields(&self) -> String {
        let text = serde_json::to_string(&self.catchup()).unwrap_or_else(|_| "{}".into());
        text.trim_start_matches('{')
            .trim_end_matches('}')
            .to_owned()
    }
}

/// Go's `time.Time` JSON form in UTC: RFC 3339 with the fraction's trailing zeros trimmed (and
/// no fraction when it is zero), `0001-01-01T00:00:00Z` for the zero time.
pub(crate) fn rfc3339_nano(ns: i64) -> String {
    if ns <= 0 {
        return "0001-01-01T00:00:00Z".into();
    }
    OffsetDateTime::from_unix_timestamp_nanos(ns.into())
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .expect("unix nanoseconds in an i64 fall in the years 1677 to 2262, which RFC 3339 covers")
}

/// Optional thresholds from the query string.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Thresholds {
    pub max_lag_seconds: Option<f64>,
    pub max_pending: Option<i64>,
}

/// Whether the state passes Go's rule and the given thresholds.
pub fn evaluate(state: &HealthState, t: &Thresholds) -> bool {
    let lag_ok = t
        .max_lag_seconds
        .is_none_or(|max| (state.apply_lag_us.load(Ordering::Relaxed) as f64 / 1e6) <= max);
    let pending_ok = t
        .max_pending
        .is_none_or(|max| state.pending.load(Ordering::Relaxed) <= max);
    state.healthy() && lag_ok && pending_ok
}

/// An axum router serving the endpoint at `path` (other paths: 404).
pub fn router(state: Arc<HealthState>, path: &str, detailed: bool) -> axum::Router {
    let answer = move |State(s): State<Arc<HealthState>>, Query(t): Query<Thresholds>| async move {
        let ok = evaluate(&s, &t);
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
        match detailed {
            true => (code, json, s.body(ok)).into_response(),
            false => code.into_response(),
        }
    };
    axum::Router::new()
        .route(path, axum::routing::any(answer))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(s: &HealthState) {
        s.db_connected.store(true, Ordering::Relaxed);
        s.nats_connected.store(true, Ordering::Relaxed);
        s.cdc_installed.store(true, Ordering::Relaxed);
        s.tables_tracked.store(2, Ordering::Relaxed);
    }

    #[test]
    fn body_keeps_go_key_order_and_zero_time() {
        let s = HealthState::new(1);
        up(&s);
        let body = s.body(true);
        let keys: Vec<&str> = [
            "status",
            "node_id",
            "uptime_seconds",
            "db_connected",
            "nats_connected",
            "cdc_installed",
            "tables_tracked",
            "last_replicated_event_timestamp",
            "last_published_event_timestamp",
            "version",
        ]
        .to_vec();
        let mut pos = 0;
        for k in keys {
            let at = body[pos..].find(&format!("\"{k}\":")).map(|i| i + pos);
            assert!(at.is_some(), "{k} missing or out of order in {body}");
            pos = at.unwrap_or(pos);
        }
        assert!(body.contains("\"last_replicated_event_timestamp\":\"0001-01-01T00:00:00Z\""));
        assert!(
            body.starts_with("{\"status\":\"healthy\",\"node_id\":1,"),
            "{body}"
        );
        assert!(body.ends_with("}\n"));
    }

    #[test]
    fn timestamps_render_like_go() {
        assert_eq!(
            rfc3339_nano(1_742_571_045_123_456_789),
            "2025-03-21T15:30:45.123456789Z"
        );
        assert_eq!(
            rfc3339_nano(1_742_571_045_500_000_000),
            "2025-03-21T15:30:45.5Z"
        );
        assert_eq!(
            rfc3339_nano(1_742_571_045_000_000_000),
            "2025-03-21T15:30:45Z"
        );
    }

    #[test]
    fn thresholds_and_go_rule() {
        let s = HealthState::new(1);
        assert!(!evaluate(&s, &Thresholds::default()), "nothing up yet");
        up(&s);
        assert!(evaluate(&s, &Thresholds::default()));
        s.applied(clock::unix_ns(), 2_500_000);
        s.pending.store(10, Ordering::Relaxed);
        let t = |lag: Option<f64>, pending: Option<i64>| Thresholds {
            max_lag_seconds: lag,
            max_pending: pending,
        };
        assert!(evaluate(&s, &t(Some(3.0), Some(10))));
        assert!(!evaluate(&s, &t(Some(2.0), None)));
        assert!(!evaluate(&s, &t(None, Some(9))));
        s.nats_connected.store(false, Ordering::Relaxed);
        assert!(!evaluate(&s, &Thresholds::default()));
    }

    #[test]
    fn publishing_held_longer_than_the_limit_is_unhealthy() {
        let s = HealthState::new(1);
        up(&s);
        let held = |since_s: i64, limit_s: i64| {
            s.update_catchup(|c| {
                c.publish_held_since_ms = Some(clock::unix_ms() - since_s * 1000);
                c.publish_held_limit_ms = limit_s * 1000;
            });
            s.healthy()
        };
        assert!(held(5, 30), "held briefly (pacing under load)");
        assert!(!held(31, 30), "held past the limit");
        assert!(s.body(false).contains("\"publish_held_since_ms\":"));
        assert!(held(3600, 0), "0: never");
        s.update_catchup(|c| c.publish_held_since_ms = None);
        assert!(s.healthy());
    }
}
