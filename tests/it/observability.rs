//! Metrics and health endpoints of running nodes: Go's series names and types, counters that move
//! with replication, and health 200/503 by Go's rule and by query thresholds.

use std::io::{Read, Write};
use std::time::Duration;

use crate::require_nats;
use crate::support::{BOOKS_SCHEMA, NatsServer, Node, REPLICATION_TIMEOUT, free_port, wait_until};

/// A plain HTTP/1.0 GET: (status code, body as text).
fn get(port: u16, path: &str) -> (u16, String) {
    let (code, body) = get_bytes(port, path);
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn observed_node(id: u64, url: &str) -> (Node, u16, u16) {
    let (metrics, health) = (free_port(), free_port());
    let node = Node::new(id, url, BOOKS_SCHEMA, 1, "");
    let text = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(
        &node.config,
        format!(
            "{text}[prometheus]\nenable = true\nbind = \"127.0.0.1:{metrics}\"\n\
             [health_check]\nenable = true\nbind = \"127.0.0.1:{health}\"\npath = \"/health\"\n"
        ),
    )
    .expect("config");
    (node, metrics, health)
}

#[test]
fn metrics_and_health_follow_replication_and_outages() {
    let bin = require_nats!();
    let mut nats = NatsServer::start(&bin);
    let (mut a, a_metrics, a_health) = observed_node(1, &nats.url);
    let (mut b, b_metrics, b_health) = observed_node(2, &nats.url);
    a.start();
    b.start();

    let (code, text) = get(a_metrics, "/metrics");
    assert_eq!(code, 200);
    for series in [
        "# TYPE harmonylite_published counter",
        "# TYPE harmonylite_pending_publish gauge",
        "# TYPE harmonylite_count_changes histogram",
        "# TYPE harmonylite_scan_changes histogram",
        "# TYPE harmonylite_schema_mismatch_paused gauge",
    ] {
        assert!(text.contains(series), "missing {series}:\n{text}");
    }
    assert_eq!(
        get(a_metrics, "/any/path").0,
        200,
        "served on every path, as Go does"
    );

    for i in 0..5 {
        a.exec(&format!(
            "INSERT INTO Books (title, author) VALUES ('m{i}', 'x')"
        ));
    }
    wait_until(REPLICATION_TIMEOUT, "rows on node 2", || {
        b.query_i64("SELECT count(*) FROM Books") == 5
    });
    wait_until(REPLICATION_TIMEOUT, "counters", || {
        let a_text = get(a_metrics, "/metrics").1;
        let b_text = get(b_metrics, "/metrics").1;
        sample(&a_text, "harmonylite_published{node_id=\"1\"}") >= 5.0
            && sample(&b_text, "harmonylite_applied{node_id=\"2\",shard=\"1\"}") >= 5.0
            && sample(
                &b_text,
                "harmonylite_apply_lag_seconds_count{node_id=\"2\"}",
            ) >= 5.0
            && sample(
                &a_text,
                "harmonylite_last_published_sequence{node_id=\"1\",shard=\"1\"}",
            ) >= 5.0
    });

    let (code, body) = get(b_health, "/health");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["node_id"], 2);
    assert_eq!(v["tables_tracked"], 2);
    assert_ne!(v["last_replicated_event_timestamp"], "0001-01-01T00:00:00Z");
    assert_eq!(
        get(b_health, "/health?max_lag_seconds=0").0,
        503,
        "lag threshold"
    );
    assert_eq!(
        get(b_health, "/health?max_lag_seconds=3600&max_pending=0").0,
        200
    );
    assert_eq!(get(b_health, "/elsewhere").0, 404);

    nats.stop();
    wait_until(Duration::from_secs(15), "health to see NATS down", || {
        get(a_health, "/health").0 == 503
    });
    assert!(
        get(a_health, "/health")
            .1
            .contains("\"nats_connected\":false")
    );
    nats.restart();
    wait_until(Duration::from_secs(30), "health to recover", || {
        get(a_health, "/health").0 == 200
    });
}

#[test]
fn pprof_serves_cpu_profiles_and_flame_graphs() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let port = free_port();
    let mut node = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "");
    node.args = vec!["-pprof".into(), format!("127.0.0.1:{port}")];
    node.start();
    // Keep the node busy while it is sampled.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (db, stop) = (node.db.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(db).expect("db");
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = conn.execute(
                    "INSERT INTO Books (title, author) VALUES (?1, 'p')",
                    [format!("p{i}")],
                );
                i += 1;
            }
        })
    };
    let (code, body) = get_bytes(port, "/debug/pprof/profile?seconds=1");
    assert_eq!(code, 200);
    use pprof::protos::Message;
    let profile = pprof::protos::Profile::parse_from_bytes(&body).expect("a protobuf profile");
    assert!(!profile.sample_type.is_empty(), "profile has sample types");
    let (code, svg) = get_bytes(port, "/debug/pprof/flamegraph?seconds=1");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().expect("writer");
    assert_eq!(code, 200);
    let svg = String::from_utf8_lossy(&svg);
    assert!(svg.contains("<svg"), "{}", &svg[..svg.len().min(200)]);
}

/// GET returning raw bytes.
fn get_bytes(port: u16, path: &str) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&raw[..split]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, raw[split..].to_vec())
}

/// `replication_log.apply_interval_ms` paces the apply thread: single-row transactions arriving
/// one by one within the interval are applied in a few commits, not one each (what breaks
/// deferred read-then-write transactions on the receiving node is the number of commits).
/// Without pacing node 2 commits about once per arriving row; `apply_interval_ms = 0` is the
/// unit test of `replicate::apply::pace`.
#[test]
fn apply_commits_are_paced_by_the_apply_interval() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (mut a, _, _) = observed_node(1, &nats.url);
    let (mut b, b_metrics, _) = observed_node(2, &nats.url);
    b.edit_config(
        "max_entries = 100000\n",
        "max_entries = 100000\napply_interval_ms = 1000\n",
    );
    a.start();
    b.start();
    let commits = || {
        let text = get(b_metrics, "/metrics").1;
        assert!(text.contains("harmonylite_apply_commits"), "{text}");
        sample(&text, "harmonylite_apply_commits{node_id=\"2\"}")
    };
    let before = commits();
    let rows = 20;
    for i in 0..rows {
        a.exec(&format!(
            "INSERT INTO Books (title, author) VALUES ('p{i}', 'x')"
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_until(REPLICATION_TIMEOUT, "rows on node 2", || {
        b.query_i64("SELECT count(*) FROM Books") == rows
    });
    let paced = commits() - before;
    assert!(
        (1.0..=(rows / 2) as f64).contains(&paced),
        "{rows} transactions arriving within about a second took {paced} apply commits"
    );
}
