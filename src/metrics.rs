//! Prometheus metrics: Go HarmonyLite's five series with their exact names, types and help texts
//! (upstream-behaviour §11), plus the replication, flow-control and snapshot signals Go lacks.
//! Invariants: names are `<namespace>_<subsystem>_<name>`, empty parts skipped, every series with
//! the const label `node_id`, as Go's client builds them; counters get no `_total` suffix (the tikv
//! `prometheus` crate, like Go's client, renders names as given). Handles are made once, shared by
//! `Arc`, never block; with `prometheus.enable` false they still work, nothing is served. The
//! exporter answers on every path, as Go's did (`/metrics` is the documented one).

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::PrometheusConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metric registration failed: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// A metric's name (joined after the namespace and subsystem) and help text.
type Def = (&'static str, &'static str);

/// Declares [`Metrics`]: each field is the series of the same name, made by the named [`Builder`]
/// method from its help text (and buckets or labels), registered in the order listed.
macro_rules! metrics {
    ($($name:ident: $ty:ty = $make:ident($help:literal $(, $arg:expr)*);)*) => {
        /// Every metric this program exports.
        pub struct Metrics {
            registry: Registry,
            $(pub $name: $ty,)*
        }

        impl Builder<'_> {
            fn build(self) -> Result<Metrics, Error> {
                Ok(Metrics {
                    $($name: self.$make(&(stringify!($name), $help) $(, $arg)*)?,)*
                    registry: self.registry,
                })
            }
        }
    };
}

/// Buckets of the microsecond histograms: 10 µs … 1 s.
const MICROS: &[f64] = &[
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 1e6,
];

metrics! {
    // Go's five series and help texts (upstream-behaviour §11). Histograms take µs, as Go's, with
    // real buckets: Go's defaults (5 ms … 10 s, read as µs) put every sample in `+Inf`.
    published: IntCounter = counter("number of rows published");
    pending_publish: IntGauge = gauge("rows pending publishing");
    count_changes: Histogram = histogram(
        "latency counting changes in microseconds", MICROS);
    scan_changes: Histogram = histogram(
        "latency scanning change rows in DB", MICROS);
    schema_mismatch_paused: IntGauge = gauge(
        "Replication paused due to schema mismatch (1=paused, 0=normal)");
    // Ours: replication.
    applied: IntCounterVec = counter_vec(
        "replicated events applied to the local database, per shard", &["shard"]);
    apply_commits: IntCounter = counter(
        "transactions the apply thread committed with other nodes' events (each can fail a local deferred read-then-write transaction)");
    apply_lag_seconds: Histogram = histogram(
        "seconds from a change entering its stream to its apply on this node", APPLY_LAG_BUCKETS);
    last_published_sequence: IntGaugeVec = gauge_vec(
        "stream sequence of this node's last acknowledged publish, per shard", &["shard"]);
    last_applied_sequence: IntGaugeVec = gauge_vec(
        "stream sequence of the last event applied, per shard", &["shard"]);
    quarantined: IntCounter = counter(
        "events that could not be applied and were recorded in __harmonylite__dead_letter");
    publish_errors: IntCounter = counter("publish passes that failed and were retried");
    skipped: IntCounterVec = counter_vec(
        "events not written because the row already matched (unchanged) or a newer local change was in flight (superseded)",
        &["reason"]);
    unique_conflicts: IntCounter = counter(
        "events held because they conflicted with another row on a UNIQUE constraint");
    conflicts: IntCounterVec = counter_vec(
        "other nodes' changes that lost to a concurrent local change of their row, kept in __harmonylite__conflicts",
        &["table", "kind"]);
    held_events: IntGauge = gauge(
        "events waiting for a UNIQUE conflict with another row to clear");
    publish_paced: IntCounter = counter(
        "times publishing waited for the slowest live node to read the stream");
    peer_lag: IntGaugeVec = gauge_vec(
        "stream sequences a node's applied position is behind the stream's end, per peer and shard",
        &["peer", "shard"]);
    // Ours: snapshots and recovery (`result`: `ok`, `failed` or `refused`).
    snapshots: IntCounterVec = counter_vec(
        "snapshot saves and restores by operation and result", &["op", "result"]);
    snapshot_seconds: HistogramVec = histogram_vec(
        "seconds a snapshot save or restore took", SNAPSHOT_BUCKETS, &["op"]);
    snapshot_size_bytes: IntGauge = gauge(
        "size of the last snapshot saved or restored on this node");
    snapshot_age_seconds: IntGauge = gauge("age of the newest snapshot known to this node");
    recoveries: IntCounter = counter(
        "times this node restored a snapshot because the streams no longer held changes it lacked");
}

const APPLY_LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const SNAPSHOT_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

/// Builds each metric with the configured name parts and `node_id` label, and registers it.
struct Builder<'a> {
    cfg: &'a PrometheusConfig,
    node_id: u64,
    registry: Registry,
}

impl Builder<'_> {
    fn opts(&self, d: &Def) -> Opts {
        Opts::new(d.0, d.1)
            .namespace(self.cfg.namespace.clone())
            .subsystem(self.cfg.subsystem.clone())
            .const_label("node_id", self.node_id.to_string())
    }

    fn register<M: Collector + Clone + 'static>(&self, metric: M) -> Result<M, Error> {
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn counter(&self, d: &Def) -> Result<IntCounter, Error> {
        self.register(IntCounter::with_opts(self.opts(d))?)
    }

    fn gauge(&self, d: &Def) -> Result<IntGauge, Error> {
        self.register(IntGauge::with_opts(self.opts(d))?)
    }

    fn histogram(&self, d: &Def, buckets: &[f64]) -> Result<Histogram, Error> {
        let opts = HistogramOpts::from(self.opts(d)).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }

    fn counter_vec(&self, d: &Def, labels: &[&str]) -> Result<IntCounterVec, Error> {
        self.register(IntCounterVec::new(self.opts(d), labels)?)
    }

    fn gauge_vec(&self, d: &Def, labels: &[&str]) -> Result<IntGaugeVec, Error> {
        self.register(IntGaugeVec::new(self.opts(d), labels)?)
    }

    fn histogram_vec(
        &self,
        d: &Def,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, Error> {
        let opts = HistogramOpts::from(self.opts(d)).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels)?)
    }
}

impl Metrics {
    /// Builds and registers every metric (fails on invalid names, e.g. a namespace with spaces).
    pub fn new(cfg: &PrometheusConfig, node_id: u64) -> Result<Arc<Metrics>, Error> {
        let b = Builder {
            cfg,
            node_id,
            registry: Registry::new(),
        };
        b.build().map(Arc::new)
    }

    /// Metrics with default names, for tests and embedders that do not serve them.
    pub fn unserved(node_id: u64) -> Arc<Metrics> {
        Metrics::new(&PrometheusConfig::default(), node_id).expect("default metric names are valid")
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// An axum router answering every path with the metrics (Go served them on every path).
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
    axum::Router::new().fallback(move || {
        let body = metrics.render();
        async move { ([(axum::http::header::CONTENT_TYPE, TEXT)], body) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series name, `# TYPE` and help text, in render order (golden).
    #[test]
    fn golden_names_types_and_help() {
        let m = Metrics::unserved(7);
        m.applied.with_label_values(&["1"]).inc();
        m.last_published_sequence.with_label_values(&["1"]).set(3);
        m.last_applied_sequence.with_label_values(&["1"]).set(3);
        m.skipped.with_label_values(&["unchanged"]).inc();
        let text = m.render();
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        assert_eq!(
            types,
            [
                "# TYPE harmonylite_applied counter",
                "# TYPE harmonylite_apply_commits counter",
                "# TYPE harmonylite_apply_lag_seconds histogram",
                "# TYPE harmonylite_count_changes histogram",
                "# TYPE harmonylite_held_events gauge",
                "# TYPE harmonylite_last_applied_sequence gauge",
                "# TYPE harmonylite_last_published_sequence gauge",
                "# TYPE harmonylite_pending_publish gauge",
                "# TYPE harmonylite_publish_errors counter",
                "# TYPE harmonylite_publish_paced counter",
                "# TYPE harmonylite_published counter",
                "# TYPE harmonylite_quarantined counter",
                "# TYPE harmonylite_recoveries counter",
                "# TYPE harmonylite_scan_changes histogram",
                "# TYPE harmonylite_schema_mismatch_paused gauge",
                "# TYPE harmonylite_skipped counter",
                "# TYPE harmonylite_snapshot_age_seconds gauge",
                "# TYPE harmonylite_snapshot_size_bytes gauge",
                "# TYPE harmonylite_unique_conflicts counter",
            ]
        );
        for help in [
            "# HELP harmonylite_published number of rows published",
            "# HELP harmonylite_pending_publish rows pending publishing",
            "# HELP harmonylite_count_changes latency counting changes in microseconds",
            "# HELP harmonylite_scan_changes latency scanning change rows in DB",
            "# HELP harmonylite_schema_mismatch_paused Replication paused due to schema mismatch (1=paused, 0=normal)",
        ] {
            assert!(text.contains(help), "missing {help}");
        }
        assert!(
            text.contains("harmonylite_published{node_id=\"7\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("harmonylite_applied{node_id=\"7\",shard=\"1\"} 1"),
            "{text}"
        );
        assert!(!text.contains("_total"), "Go names have no _total suffix");
    }

    /// The scan latencies are microseconds: a typical 300 µs scan lands in a finite bucket.
    #[test]
    fn microsecond_histograms_have_microsecond_buckets() {
        let m = Metrics::new(&PrometheusConfig::default(), 1).expect("valid");
        m.scan_changes.observe(300.0);
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("harmonylite_scan_changes_bucket{") && l.contains("le=\"500\""))
            .unwrap_or_else(|| panic!("a 500 µs bucket: {text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }

    #[test]
    fn namespace_and_subsystem_join_like_go() {
        let cfg = PrometheusConfig {
            namespace: "acme".into(),
            subsystem: "db".into(),
            ..PrometheusConfig::default()
        };
        let text = Metrics::new(&cfg, 1).expect("valid").render();
        assert!(text.contains("# TYPE acme_db_published counter"), "{text}");
        let cfg = PrometheusConfig {
            namespace: String::new(),
            ..PrometheusConfig::default()
        };
        assert!(
            Metrics::new(&cfg, 1)
                .expect("valid")
                .render()
                .contains("# TYPE published counter")
        );
        let bad = PrometheusConfig {
            namespace: "has space".into(),
            ..PrometheusConfig::default()
        };
        assert!(Metrics::new(&bad, 1).is_err());
    }
}
