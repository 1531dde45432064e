//! Operational behaviour: `replicate = false`, JSON logs, change-log cleanup, and a NATS outage
//! under write load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::require_nats;
use crate::support::{
    BOOKS_SCHEMA, NatsServer, Node, REPLICATION_TIMEOUT, happens_within, wait_until,
};

#[test]
fn replicate_false_does_not_apply_remote_changes_but_still_publishes() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut a = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "");
    let mut b = Node::new(2, &nats.url, BOOKS_SCHEMA, 1, "replicate = false");
    a.start();
    b.start();
    b.exec("INSERT INTO Books (id, title, author) VALUES (100, 'from b', 'x')");
    wait_until(REPLICATION_TIMEOUT, "b's write on a", || {
        a.query_i64("SELECT count(*) FROM Books WHERE id = 100") == 1
    });
    a.exec("INSERT INTO Books (id, title, author) VALUES (200, 'from a', 'x')");
    // a applies its own event through the same stream; once it has, b would have too.
    wait_until(
        REPLICATION_TIMEOUT,
        "a's seq map to cover its write",
        || {
            harmonylite::seqmap::SeqMap::open(&a.seq_map())
                .is_ok_and(|m| m.get("harmonylite-changes-c-1") >= 2)
        },
    );
    assert!(
        !happens_within(Duration::from_millis(500), || {
            b.query_i64("SELECT count(*) FROM Books WHERE id = 200") == 1
        }),
        "replicate = false applied a remote change"
    );
    assert!(
        !b.seq_map().exists(),
        "a non-replicating node records no applied sequence"
    );
}

#[test]
fn json_logs_carry_node_id_on_every_line() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut node = Node::new(7, &nats.url, BOOKS_SCHEMA, 1, "");
    let config = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(
        &node.config,
        config.replace(
            "[logging]\nverbose = true\n",
            "[logging]\nverbose = true\nformat = \"json\"\n",
        ),
    )
    .expect("config");
    node.start();
    node.exec("INSERT INTO Books (title, author) VALUES ('logged', 'x')");
    wait_until(REPLICATION_TIMEOUT, "own change applied", || {
        node.log().contains("publish pass sent")
    });
    assert!(node.terminate().success());
    let log = node.log();
    let mut saw_schema_hash = false;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["node_id"], 7, "{line}");
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["message"] == "Computed schema hash"
            || v["message"] == "Computed schema hash"
        {
            saw_schema_hash = true;
        }
    }
    assert!(
        saw_schema_hash,
        "upstream's 'Computed schema hash' line is logged:\n{log}"
    );
}

#[test]
fn published_change_logs_are_cleaned_up() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut a = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "");
    a.start();
    for i in 0..20 {
        a.exec(&format!(
            "INSERT INTO Books (title, author) VALUES ('c{i}', 'x')"
        ));
    }
    // cleanup_interval = 1000 ms in test configs: published rows older than that are deleted.
    wait_until(REPLICATION_TIMEOUT, "change log to be emptied", || {
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
            && a.query_i64("SELECT count(*) FROM __harmonylite__Books_change_log") == 0
    });
    assert_eq!(a.query_i64("SELECT count(*) FROM Books"), 20);
}

#[test]
fn nats_outage_under_write_load_loses_nothing() {
    let bin = require_nats!();
    let mut nats = NatsServer::start(&bin);
    let mut a = Node::new(1, &nats.url, BOOKS_SCHEMA, 2, "");
    let mut b = Node::new(2, &nats.url, BOOKS_SCHEMA, 2, "");
    a.start();
    b.start();
    let written = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, written, stop) = (a.db.clone(), Arc::clone(&written), Arc::clone(&stop));
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(db).expect("writer");
            conn.busy_timeout(Duration::from_secs(10)).expect("timeout");
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                conn.execute(
                    "INSERT INTO Books (title, author) VALUES (?1, 'load')",
                    [format!("load {i}")],
                )
                .expect("insert");
                i += 1;
                written.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let at_least = |n: i64| {
        let w = Arc::clone(&written);
        wait_until(Duration::from_secs(60), &format!("{n} writes"), move || {
            w.load(Ordering::Relaxed) >= n
        });
    };
    at_least(100);
    nats.stop();
    let during = written.load(Ordering::Relaxed);
    at_least(during + 200); // the application keeps committing while NATS is down
    nats.restart();
    at_least(during + 400);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let total = written.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(60), "every row on node 2", || {
        b.query_i64("SELECT count(*) FROM Books WHERE author = 'load'") == total
    });
    assert_eq!(b.checksum("Books"), a.checksum("Books"));
    assert!(a.log().contains("NATS client reconnected"), "{}", a.log());
}

#[test]
fn sleep_timeout_exits_cleanly_after_idling() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut node = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "sleep_timeout = 1500");
    node.start();
    // Activity keeps it awake.
    for i in 0..4 {
        node.exec(&format!(
            "INSERT INTO Books (title, author) VALUES ('awake {i}', 'x')"
        ));
        std::thread::sleep(Duration::from_millis(500)); // pacing the writes, not waiting for state
    }
    assert!(
        node.wait_exit(Duration::from_millis(10)).is_none(),
        "slept while busy"
    );
    let status = node.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", node.log());
    assert!(
        node.log()
            .contains("No more events to process, initiating shutdown")
    );
}
