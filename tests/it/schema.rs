//! Schema changes (issue "schema changes"): rolling upgrades with restarts (upstream e2e
//! scenario 11, without dropping the change log by hand), the same migration on running nodes,
//! and renames and drops while writes go on. Nothing may be quarantined, captured twice or left
//! behind in a change log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::require_nats;
use crate::support::{NatsServer, Node, REPLICATION_TIMEOUT, cluster, happens_within, wait_until};

/// Upstream's scenario-11 migration.
const ADD_RATING: &str = "ALTER TABLE Books ADD COLUMN rating INTEGER";

fn count_rating(node: &Node, title: &str, rating: i64) -> i64 {
    node.conn()
        .query_row(
            "SELECT count(*) FROM Books WHERE title = ?1 AND rating = ?2",
            rusqlite::params![title, rating],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

/// No event quarantined, none left waiting or held, nothing left to publish.
fn settled(node: &Node) -> bool {
    node.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 0
        && node.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
}

fn assert_nothing_quarantined(nodes: &[Node]) {
    for n in nodes {
        assert_eq!(
            n.query_i64("SELECT count(*) FROM __harmonylite__dead_letter"),
            0,
            "node {} quarantined events\n{}",
            n.id,
            n.log()
        );
    }
}

/// Upstream e2e scenario 11: each node is stopped, migrated and restarted in turn; the upgraded
/// node's insert waits on the others until they are upgraded too, then arrives.
#[test]
fn rolling_upgrade_with_restarts_loses_nothing() {
    rolling_upgrade_with_restarts(false);
}

/// The same, as upstream's suite literally runs it: the change log is dropped by hand before
/// the restart (harmonylite then publishes the table's rows once more; nothing else changes).
#[test]
fn rolling_upgrade_with_restarts_and_a_dropped_change_log() {
    rolling_upgrade_with_restarts(true);
}

fn rolling_upgrade_with_restarts(drop_log: bool) {
    let migrate = |n: &Node| {
        n.exec(ADD_RATING);
        if drop_log {
            n.exec("DROP TABLE IF EXISTS __harmonylite__Books_change_log");
        }
    };
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut nodes = cluster(&nats, 3, 2);
    nodes[0].exec("INSERT INTO Books (title, author) VALUES ('baseline', 'a')");
    for n in &nodes[1..] {
        wait_until(REPLICATION_TIMEOUT, "baseline", || {
            n.query_i64("SELECT count(*) FROM Books WHERE title = 'baseline'") == 1
        });
    }
    nodes[0].kill();
    migrate(&nodes[0]);
    nodes[0].start();
    nodes[0].exec("INSERT INTO Books (title, author, rating) VALUES ('rated', 'a', 5)");
    assert!(
        !happens_within(Duration::from_secs(5), || count_rating(
            &nodes[1], "rated", 5
        ) > 0
            || nodes[1]
                .query_i64("SELECT count(*) FROM Books WHERE title = 'rated'")
                > 0),
        "the row reached node 2 before its schema had the column"
    );
    assert!(
        nodes[1]
            .log()
            .contains("Schema mismatch detected, pausing replication")
    );
    nodes[1].kill();
    migrate(&nodes[1]);
    nodes[1].start();
    wait_until(Duration::from_secs(60), "the row on node 2", || {
        count_rating(&nodes[1], "rated", 5) == 1
    });
    assert_eq!(
        nodes[2].query_i64("SELECT count(*) FROM Books WHERE title = 'rated'"),
        0
    );
    nodes[2].kill();
    migrate(&nodes[2]);
    nodes[2].start();
    wait_until(Duration::from_secs(60), "the row on node 3", || {
        count_rating(&nodes[2], "rated", 5) == 1
    });
    nodes[0].exec("INSERT INTO Books (title, author, rating) VALUES ('final', 'a', 4)");
    for n in &nodes[1..] {
        wait_until(REPLICATION_TIMEOUT, "final row", || {
            count_rating(n, "final", 4) == 1
        });
    }
    for n in &nodes {
        wait_until(REPLICATION_TIMEOUT, "settled", || settled(n));
    }
    assert_nothing_quarantined(&nodes);
}

/// Scenario 11 with no restarts at all: the application migrates each running node in turn.
#[test]
fn rolling_upgrade_on_running_nodes_loses_nothing() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let nodes = cluster(&nats, 3, 2);
    nodes[0].exec(ADD_RATING);
    // Capture follows at once: the very first write after the DDL carries the new column.
    nodes[0].exec("INSERT INTO Books (title, author, rating) VALUES ('rated', 'a', 5)");
    assert!(
        !happens_within(Duration::from_secs(3), || {
            nodes[1].query_i64("SELECT count(*) FROM Books WHERE title = 'rated'") > 0
        }),
        "the row reached node 2 before its schema had the column"
    );
    nodes[1].exec(ADD_RATING);
    wait_until(REPLICATION_TIMEOUT, "the row on node 2", || {
        count_rating(&nodes[1], "rated", 5) == 1
    });
    assert_eq!(
        nodes[2].query_i64("SELECT count(*) FROM Books WHERE title = 'rated'"),
        0
    );
    nodes[2].exec(ADD_RATING);
    wait_until(REPLICATION_TIMEOUT, "the row on node 3", || {
        count_rating(&nodes[2], "rated", 5) == 1
    });
    nodes[2].exec("INSERT INTO Books (title, author, rating) VALUES ('final', 'a', 4)");
    for n in &nodes[..2] {
        wait_until(REPLICATION_TIMEOUT, "final row", || {
            count_rating(n, "final", 4) == 1
        });
    }
    for n in &nodes {
        wait_until(REPLICATION_TIMEOUT, "settled", || settled(n));
        assert!(n.pid().is_some(), "node {} stopped\n{}", n.id, n.log());
        assert_eq!(n.log().matches("Replication running").count(), 1);
    }
    assert_nothing_quarantined(&nodes);
}

/// Writes on one node until stopped: inserts and updates of Books, and once the node is
/// migrated, of its new columns and table too.
fn writer(node: &Node, stop: Arc<AtomicBool>, migrated: Arc<AtomicBool>, done: Arc<AtomicUsize>) {
    let conn = node.conn();
    let id = node.id;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let title = format!("n{id}-{i}");
        let ok = if migrated.load(Ordering::Relaxed) {
            conn.execute(
                "INSERT INTO Books (title, author, year, rating) VALUES (?1, 'w', ?2, ?3)",
                rusqlite::params![title, i as i64, (i % 5) as i64],
            )
            .and_then(|_| {
                let book = conn.last_insert_rowid();
                conn.execute(
                    "INSERT INTO Reviews (book_id, body) VALUES (?1, ?2)",
                    rusqlite::params![book, format!("review {title}")],
                )
            })
            .and_then(|_| {
                conn.execute(
                    "UPDATE Books SET rating = coalesce(rating, 0) + 1 WHERE id = (SELECT max(id) - 3 FROM Books)",
                    [],
                )
            })
        } else {
            conn.execute(
                "INSERT INTO Books (title, author) VALUES (?1, 'w')",
                [&title],
            )
            .and_then(|_| {
                conn.execute(
                    "UPDATE Books SET author = author || '+' WHERE id = (SELECT max(id) - 2 FROM Books)",
                    [],
                )
            })
        };
        // A write racing the node's own migration may fail; the application retries.
        if ok.is_ok() {
            done.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The migration of the Done-when list, applied by the application on running nodes, one node
/// at a time, while every node keeps writing.
const MIGRATION: &str = "
    CREATE TABLE Reviews (id INTEGER PRIMARY KEY, book_id INTEGER REFERENCES Books(id), body TEXT);
    CREATE INDEX reviews_by_book ON Reviews(book_id);
    ALTER TABLE Books ADD COLUMN rating INTEGER;
    ALTER TABLE Books RENAME COLUMN publication_year TO year;";

#[test]
fn migration_on_running_nodes_with_writes_everywhere_converges() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let nodes = cluster(&nats, 3, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let migrated: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let done = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|scope| {
        for (n, m) in nodes.iter().zip(&migrated) {
            let (stop, m, done) = (Arc::clone(&stop), Arc::clone(m), Arc::clone(&done));
            scope.spawn(move || writer(n, stop, m, done));
        }
        // HARMONYLITE_MIGRATION_GAP_MS: how long to write between two nodes' migrations (a
        // manual check of "minutes apart"); by default, until 50 more writes.
        let gap = std::env::var("HARMONYLITE_MIGRATION_GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        for (n, m) in nodes.iter().zip(&migrated) {
            let before = done.load(Ordering::Relaxed);
            let since = std::time::Instant::now();
            let limit = REPLICATION_TIMEOUT + gap.unwrap_or_default();
            wait_until(limit, "writes before the migration", || {
                done.load(Ordering::Relaxed) > before + 50
                    && gap.is_none_or(|g| since.elapsed() >= g)
            });
            let conn = n.conn();
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {MIGRATION} COMMIT;"))
                .expect("migration");
            m.store(true, Ordering::Relaxed);
        }
        let before = done.load(Ordering::Relaxed);
        wait_until(REPLICATION_TIMEOUT, "writes after the migration", || {
            done.load(Ordering::Relaxed) > before + 100
        });
        stop.store(true, Ordering::Relaxed);
    });
    for n in &nodes {
        wait_until(Duration::from_secs(60), "settled", || settled(n));
    }
    for table in ["Books", "Reviews"] {
        let want = nodes[0].checksum(table);
        for n in &nodes[1..] {
            wait_until(
                Duration::from_secs(60),
                &format!("{table} equal on node {}", n.id),
                || n.checksum(table) == want,
            );
        }
    }
    assert!(nodes[0].query_i64("SELECT count(*) FROM Reviews") > 0);
    assert!(nodes[0].query_i64("SELECT count(*) FROM Books WHERE rating IS NOT NULL") > 0);
    assert_nothing_quarantined(&nodes);
}

/// Renaming a table and a column, then dropping a table, on running nodes: every write is
/// captured once, nothing is left pending, nothing is quarantined.
#[test]
fn renames_and_drops_while_running_capture_once_and_leak_nothing() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let nodes = cluster(&nats, 2, 1);
    let writes = |node: &Node, table: &str, column: &str, from: i64| {
        let conn = node.conn();
        for i in from..from + 200 {
            // Explicit ids: the nodes write at the same time.
            conn.execute(
                &format!("INSERT INTO {table} (id, {column}, author) VALUES (?1, ?2, 'x')"),
                rusqlite::params![i + 1, format!("t{i}")],
            )
            .expect("write");
        }
    };
    writes(&nodes[0], "Books", "title", 0);
    for n in &nodes {
        n.exec("ALTER TABLE Books RENAME TO Volumes");
    }
    writes(&nodes[0], "Volumes", "title", 200);
    writes(&nodes[1], "Volumes", "title", 400);
    for n in &nodes {
        n.exec("ALTER TABLE Volumes RENAME COLUMN title TO name");
    }
    writes(&nodes[1], "Volumes", "name", 600);
    for n in &nodes {
        wait_until(REPLICATION_TIMEOUT, "800 rows", || {
            n.query_i64("SELECT count(*) FROM Volumes") == 800
        });
        wait_until(REPLICATION_TIMEOUT, "settled", || settled(n));
        // Each write captured exactly once (Go captured renamed tables' writes twice).
        let captured = n.query_i64("SELECT count(*) FROM __harmonylite__Volumes_change_log");
        assert!(captured <= 800, "node {} captured {captured} changes", n.id);
        assert_eq!(
            n.query_i64(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = 'Volumes'"
            ),
            3
        );
    }
    assert_eq!(nodes[0].checksum("Volumes"), nodes[1].checksum("Volumes"));
    // Drop: its change log goes, and later events for it (none here) would be discarded.
    for n in &nodes {
        n.exec("DROP TABLE Authors");
    }
    for n in &nodes {
        wait_until(
            REPLICATION_TIMEOUT,
            "the change log of the dropped table to go",
            || {
                n.query_i64(
                "SELECT count(*) FROM sqlite_schema WHERE name = '__harmonylite__Authors_change_log'",
            ) == 0
            },
        );
    }
    writes(&nodes[0], "Volumes", "name", 800);
    for n in &nodes {
        wait_until(REPLICATION_TIMEOUT, "1000 rows", || {
            n.query_i64("SELECT count(*) FROM Volumes") == 1000
        });
        wait_until(REPLICATION_TIMEOUT, "settled", || settled(n));
    }
    assert_nothing_quarantined(&nodes);
    for n in &nodes {
        assert!(
            !n.log().contains("Dropping change-log entry"),
            "{}",
            n.log()
        );
    }
}

/// `-schema-status` reads the local schema; `-schema-status-cluster` shows every running node's
/// registry entry, kept current after DDL.
#[test]
fn schema_status_reports_local_and_cluster_state() {
    use crate::support::run_to_exit;
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let nodes = cluster(&nats, 2, 1);
    let books = "77ffca4ecf9399127b5ce2be978aaae00de8f1dc5956a16fe45bfb42c3f4117e";
    let (code, out) = run_to_exit(
        &nodes[0].config,
        &["-schema-status"],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("Schema Hash: {books}\n")), "{out}");
    assert!(
        out.contains("Node ID: 1\n") && out.contains("Watched Tables:\n  - Authors\n  - Books\n"),
        "{out}"
    );
    let status = || {
        run_to_exit(
            &nodes[0].config,
            &["-schema-status-cluster"],
            Duration::from_secs(20),
        )
    };
    wait_until(REPLICATION_TIMEOUT, "both nodes in the registry", || {
        let (code, out) = status();
        code == Some(0) && out.contains("Total Nodes: 2\n") && out.contains("Consistent: Yes\n")
    });
    nodes[1].exec(ADD_RATING);
    wait_until(
        REPLICATION_TIMEOUT,
        "the registry to show node 2's new hash",
        || {
            let (_, out) = status();
            out.contains("Consistent: No\n") && out.contains("hash mismatch")
        },
    );
    let (_, out) = status();
    assert!(
        out.contains(&format!("    Schema Hash: {books}\n")),
        "{out}"
    );
    assert!(
        nodes[1]
            .log()
            .contains("Published schema state to cluster registry")
    );
}

/// Two running nodes with a short snapshot lease, node 1 the snapshot leader; `max_entries`
/// limits the streams.
fn leader_and_follower(nats: &NatsServer, max_entries: Option<u64>) -> Vec<Node> {
    let mut nodes: Vec<Node> = (1..=2)
        .map(|id| {
            let n = Node::new(id, &nats.url, crate::support::BOOKS_SCHEMA, 1, "");
            if let Some(m) = max_entries {
                n.set_max_entries(m);
            }
            n.append_config("[snapshot]\nleader_ttl = 3000");
            n
        })
        .collect();
    nodes[0].start();
    wait_until(REPLICATION_TIMEOUT, "node 1 to lead", || {
        nodes[0].log().contains("Became snapshot leader")
    });
    nodes[1].start();
    nodes
}

/// A node whose events wait for a migration gives up the snapshot leadership (its database lacks
/// those changes); another node takes it.
#[test]
fn a_node_behind_on_a_migration_does_not_lead_snapshots() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let nodes = leader_and_follower(&nats, None);
    nodes[1].exec(ADD_RATING);
    nodes[1].exec("INSERT INTO Books (title, author, rating) VALUES ('rated', 'a', 5)");
    wait_until(
        REPLICATION_TIMEOUT,
        "node 1 to give up the leadership",
        || {
            nodes[0]
                .log()
                .contains("Lost snapshot leadership: this node waits for a schema migration")
        },
    );
    wait_until(REPLICATION_TIMEOUT, "node 2 to lead", || {
        nodes[1].log().contains("Became snapshot leader")
    });
    nodes[0].exec(ADD_RATING);
    wait_until(REPLICATION_TIMEOUT, "the row on node 1", || {
        count_rating(&nodes[0], "rated", 5) == 1
    });
    assert_nothing_quarantined(&nodes);
}

/// A node behind on a migration that must restore a snapshot of a node ahead of it (the streams
/// moved on while it was down) does not restore it yet: it says what it waits for, and restores
/// right after its own migration, with every row and value the other node has and the rows its
/// application wrote meanwhile.
#[test]
fn a_restore_while_behind_on_a_migration_loses_nothing() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut nodes = leader_and_follower(&nats, Some(8));
    nodes[0].exec("INSERT INTO Books (title, author) VALUES ('before', 'a')");
    wait_until(REPLICATION_TIMEOUT, "the row on node 2", || {
        nodes[1].query_i64("SELECT count(*) FROM Books") == 1
    });
    nodes[1].kill();
    // Node 1 migrates and writes the new column and table, far more than the streams keep.
    const MIGRATION: &str = "ALTER TABLE Books ADD COLUMN rating INTEGER;
         CREATE TABLE Reviews (id INTEGER PRIMARY KEY, book INTEGER REFERENCES Books(id), body TEXT);";
    nodes[0].exec(MIGRATION);
    wait_until(
        REPLICATION_TIMEOUT,
        "node 1 to follow its migration",
        || {
            nodes[0]
                .log()
                .contains("Capture reinstalled for the new schema")
        },
    );
    for i in 0..20 {
        nodes[0].exec(&format!(
            "INSERT INTO Books (title, author, rating) VALUES ('b{i}', 'a', {i});
             INSERT INTO Reviews (book, body) VALUES (last_insert_rowid(), 'review {i}');"
        ));
    }
    nodes[0].exec("UPDATE Books SET rating = 99 WHERE title = 'before'");
    wait_until(REPLICATION_TIMEOUT, "node 1 to publish", || {
        nodes[0].query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
    });
    nodes[1].start();
    wait_until(
        REPLICATION_TIMEOUT * 2,
        "node 2 to wait for its migration",
        || {
            nodes[1]
                .log()
                .contains("waiting for this node's migration to restore: snapshot has")
        },
    );
    let log = nodes[1].log();
    assert!(
        log.contains("column \"rating\" of table \"Books\"") && log.contains("table \"Reviews\""),
        "node 2 did not name what it lacks\n{log}"
    );
    assert!(
        !log.contains("Restore complete"),
        "restored while behind\n{log}"
    );
    // Its application goes on writing meanwhile; its own migration lets the restore through.
    nodes[1].exec("INSERT INTO Books (id, title, author) VALUES (1000, 'while waiting', 'b')");
    nodes[1].exec(MIGRATION);
    wait_until(REPLICATION_TIMEOUT * 2, "node 2 to restore", || {
        nodes[1].log().contains("Restore complete")
    });
    nodes[0].exec("INSERT INTO Reviews (id, book, body) VALUES (100, 1, 'after')");
    nodes[1].exec("INSERT INTO Reviews (id, book, body) VALUES (101, 2, 'from node 2')");
    wait_until(REPLICATION_TIMEOUT, "equal tables", || {
        nodes.iter().all(settled)
            && nodes[0].checksum("Books") == nodes[1].checksum("Books")
            && nodes[0].checksum("Reviews") == nodes[1].checksum("Reviews")
            && nodes[0].query_i64("SELECT count(*) FROM Reviews") == 22
            && nodes[0].query_i64("SELECT count(*) FROM Books WHERE title = 'while waiting'") == 1
    });
    assert_eq!(
        nodes[1].query_i64("SELECT rating FROM Books WHERE title = 'before'"),
        99
    );
    assert_nothing_quarantined(&nodes);
}

/// A node started on an empty file (no application table at all) is not behind on a
/// migration: it takes the cluster's snapshot whole, schema included, replicates both ways,
/// and the registry says the cluster is consistent.
#[test]
fn a_node_started_on_an_empty_file_joins_and_converges() {
    use crate::support::run_to_exit;
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut nodes = leader_and_follower(&nats, Some(8));
    nodes[1].kill();
    for i in 0..30 {
        nodes[0].exec(&format!(
            "INSERT INTO Books (title, author) VALUES ('b{i}', 'a')"
        ));
    }
    wait_until(REPLICATION_TIMEOUT, "node 1 to publish", || {
        settled(&nodes[0])
    });
    let fresh = Node::new(3, &nats.url, "", 1, "");
    fresh.set_max_entries(8);
    nodes.push(fresh);
    nodes[2].start();
    wait_until(REPLICATION_TIMEOUT * 2, "the new node to restore", || {
        nodes[2].log().contains("Restore complete")
    });
    assert!(
        !nodes[2].log().contains("waiting for this node's migration"),
        "{}",
        nodes[2].log()
    );
    nodes[2].exec("INSERT INTO Books (id, title, author) VALUES (500, 'from the new node', 'c')");
    wait_until(REPLICATION_TIMEOUT, "equal tables", || {
        settled(&nodes[0])
            && settled(&nodes[2])
            && nodes[0].query_i64("SELECT count(*) FROM Books") == 31
            && nodes[0].checksum("Books") == nodes[2].checksum("Books")
            && nodes[0].checksum("Authors") == nodes[2].checksum("Authors")
    });
    wait_until(REPLICATION_TIMEOUT, "a consistent registry", || {
        let (code, out) = run_to_exit(
            &nodes[2].config,
            &["-schema-status-cluster"],
            Duration::from_secs(20),
        );
        code == Some(0) && out.contains("Consistent: Yes\n")
    });
    assert_nothing_quarantined(&nodes);
}
