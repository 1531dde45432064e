//! Regression tests for the replication core (one per finding of the core issue): each one
//! reproduces what a user saw go wrong and checks the invariant it broke (I1 no committed row
//! changed except by a later write to it, I2 convergence, I3 values unconverted, I4 no old change
//! over a newer one, I5 never silently idle, I6 no application errors caused by us).

use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::require_nats;
use crate::support::{
    NatsServer, Node, REPLICATION_TIMEOUT, happens_within, run_to_exit, wait_until,
};

/// Two nodes on one server with `schema`.
fn pair(nats: &NatsServer, schema: &str, shards: u64, extra: &str) -> (Node, Node) {
    let mut a = Node::new(1, &nats.url, schema, shards, extra);
    let mut b = Node::new(2, &nats.url, schema, shards, extra);
    a.start();
    b.start();
    (a, b)
}

/// One running node with a one-table schema.
fn solo(nats: &NatsServer) -> Node {
    let mut a = Node::new(
        1,
        &nats.url,
        "CREATE TABLE t (id INTEGER PRIMARY KEY)",
        1,
        "",
    );
    a.start();
    a
}

/// Every row of `sql` as text `typeof:value` cells, for exact comparisons.
fn dump(node: &Node, sql: &str) -> Vec<String> {
    let conn = node.conn();
    let mut stmt = conn.prepare(sql).expect(sql);
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            let mut cells = Vec::with_capacity(n);
            for i in 0..n {
                use rusqlite::types::ValueRef;
                cells.push(match r.get_ref(i)? {
                    ValueRef::Null => "null".to_owned(),
                    ValueRef::Integer(v) => format!("integer:{v}"),
                    ValueRef::Real(v) => format!("real:{v:?}"),
                    ValueRef::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                    ValueRef::Blob(b) => format!("blob:{b:02x?}"),
                });
            }
            Ok(cells.join("|"))
        })
        .expect(sql);
    rows.collect::<Result<_, _>>().expect(sql)
}

/// Waits until both nodes hold the same rows for `sql` and `want` says they are complete.
fn converge(a: &Node, b: &Node, sql: &str, want: impl Fn(&[String]) -> bool) {
    let ok = happens_within(REPLICATION_TIMEOUT, || {
        let (x, y) = (dump(a, sql), dump(b, sql));
        x == y && want(&x)
    });
    assert!(
        ok,
        "nodes did not converge on {sql}:\nnode 1: {:?}\nnode 2: {:?}\n{}",
        dump(a, sql),
        dump(b, sql),
        b.log()
    );
}

/// Finding 1: after the cluster sits idle, one insert reached the other node only after 2.5–17 s.
#[test]
fn writes_after_idle_arrive_without_a_stall() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        1,
        "",
    );
    for (round, idle_ms) in [1500u64, 2500, 3500, 6000].into_iter().enumerate() {
        // Idle long enough for the consumer's fetch to sit on the server (and expire once).
        let quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(idle_ms) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let start = Instant::now();
        a.exec(&format!("INSERT INTO t VALUES ({round}, 'after idle')"));
        wait_until(REPLICATION_TIMEOUT, "the insert to arrive", || {
            b.query_i64(&format!("SELECT count(*) FROM t WHERE id = {round}")) == 1
        });
        // A stall is seconds (a fetch sleeping to its 5 s expiry); normal is milliseconds.
        assert!(
            start.elapsed() < Duration::from_millis(2000),
            "round {round}: insert took {:?} after {idle_ms} ms idle\n{}",
            start.elapsed(),
            b.log()
        );
    }
    assert!(
        !b.log().contains("consumer stalled behind the stream"),
        "{}",
        b.log()
    );
}

/// Finding 2: with a UNIQUE column and two shards, re-applying 144's first image deleted 145
/// through the conflict, on the origin and on the receiver.
#[test]
fn unique_values_moving_between_rows_lose_nothing() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE)",
        2,
        "",
    );
    for i in 0..40 {
        let (x, y) = (1000 + 2 * i, 1001 + 2 * i);
        a.exec(&format!(
            "INSERT INTO users VALUES ({x}, 'x{i}'); UPDATE users SET email = 'y{i}' WHERE id = {x};
             INSERT INTO users VALUES ({y}, 'x{i}');"
        ));
    }
    converge(&a, &b, "SELECT id, email FROM users ORDER BY id", |rows| {
        rows.len() == 80
    });
    // The origin still has every row it committed, once its own events have all come back.
    wait_until(REPLICATION_TIMEOUT, "own events to come back", || {
        a.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 0
            && b.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 0
    });
    assert_eq!(a.query_i64("SELECT count(*) FROM users"), 80);
    assert_eq!(b.query_i64("SELECT count(*) FROM users"), 80);
}

/// Finding 3: an UPDATE of the primary key left the old row on the other nodes.
#[test]
fn primary_key_updates_replicate_as_moves() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE i (k INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE s (k TEXT PRIMARY KEY, v TEXT);
         CREATE TABLE r (v TEXT);",
        2,
        "",
    );
    a.exec(
        "INSERT INTO i VALUES (1, 'a'); INSERT INTO s VALUES ('one', 'a');
         INSERT INTO r (rowid, v) VALUES (1, 'a');",
    );
    converge(&a, &b, "SELECT * FROM i", |r| r.len() == 1);
    converge(&a, &b, "SELECT rowid, v FROM r", |r| r.len() == 1);
    a.exec(
        "UPDATE i SET k = 5 WHERE k = 1; UPDATE s SET k = 'five' WHERE k = 'one';
         UPDATE r SET rowid = 5 WHERE rowid = 1;",
    );
    converge(&a, &b, "SELECT k FROM i", |r| r == ["integer:5"]);
    converge(&a, &b, "SELECT k FROM s", |r| r == ["text:five"]);
    converge(&a, &b, "SELECT rowid FROM r", |r| r == ["integer:5"]);
}

/// Finding 4: NULL in a TEXT primary key made rows multiply on every apply.
#[test]
fn null_in_a_text_key_does_not_multiply_rows() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(&nats, "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)", 1, "");
    a.exec("INSERT INTO t VALUES (NULL, 'a'); INSERT INTO t VALUES ('x', 'b');");
    a.exec("UPDATE t SET v = 'c' WHERE k IS NULL");
    converge(&a, &b, "SELECT k, v FROM t ORDER BY k", |r| {
        r == ["null|text:c", "text:x|text:b"]
    });
    // Let every own event come back and a cleanup pass run; nothing may multiply meanwhile.
    wait_until(REPLICATION_TIMEOUT, "own events to come back", || {
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
    });
    assert_eq!(a.query_i64("SELECT count(*) FROM t"), 2);
    assert_eq!(b.query_i64("SELECT count(*) FROM t"), 2);
}

/// Finding 5: a STRICT table's ANY column turned '00123', 1.0 and '1e3' into integers on every
/// node, the origin included.
#[test]
fn strict_any_columns_keep_their_types_everywhere() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v ANY) STRICT",
        1,
        "",
    );
    a.exec(
        "INSERT INTO t VALUES (1, '00123'); INSERT INTO t VALUES (2, 1.0);
         INSERT INTO t VALUES (3, '1e3'); INSERT INTO t VALUES (4, x'0001');",
    );
    let want = [
        "integer:1|text:00123",
        "integer:2|real:1.0",
        "integer:3|text:1e3",
        "integer:4|blob:[00, 01]",
    ];
    converge(&a, &b, "SELECT id, v FROM t ORDER BY id", |r| r == want);
    wait_until(REPLICATION_TIMEOUT, "own events to come back", || {
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
    });
    assert_eq!(dump(&a, "SELECT id, v FROM t ORDER BY id"), want);
}

/// Finding 6: own events coming back changed the origin's rowids (REPLACE = delete + insert),
/// breaking FTS external-content tables.
#[test]
fn rowids_survive_own_events_and_fts_keeps_working() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE docs (slug TEXT PRIMARY KEY, body TEXT);
         CREATE VIRTUAL TABLE docs_fts USING fts5(body, content='docs', content_rowid='rowid');
         CREATE TRIGGER docs_ai AFTER INSERT ON docs BEGIN
           INSERT INTO docs_fts(rowid, body) VALUES (new.rowid, new.body); END;
         CREATE TRIGGER docs_au AFTER UPDATE ON docs BEGIN
           INSERT INTO docs_fts(docs_fts, rowid, body) VALUES ('delete', old.rowid, old.body);
           INSERT INTO docs_fts(rowid, body) VALUES (new.rowid, new.body); END;";
    let (a, b) = pair(&nats, schema, 1, "");
    a.exec(
        "INSERT INTO docs VALUES ('a', 'alpha words'); INSERT INTO docs VALUES ('b', 'beta words');
         UPDATE docs SET body = 'gamma words' WHERE slug = 'a';",
    );
    let before = dump(&a, "SELECT rowid, slug FROM docs ORDER BY slug");
    converge(&a, &b, "SELECT slug, body FROM docs ORDER BY slug", |r| {
        r.len() == 2
    });
    wait_until(REPLICATION_TIMEOUT, "own events to come back", || {
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
    });
    assert_eq!(
        dump(&a, "SELECT rowid, slug FROM docs ORDER BY slug"),
        before
    );
    assert_eq!(
        a.query_text("SELECT d.slug FROM docs_fts f JOIN docs d ON d.rowid = f.rowid WHERE docs_fts MATCH 'gamma'"),
        Some("a".into())
    );
}

/// Finding 7: after ALTER TABLE ADD COLUMN (no restart), a write to the new column was wiped on
/// the origin some seconds later by its own event, which lacked the column.
#[test]
fn a_new_column_is_not_wiped_by_own_events_before_a_restart() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        1,
        "",
    );
    a.exec("ALTER TABLE t ADD COLUMN extra TEXT; INSERT INTO t VALUES (1, 'a', 'kept');");
    b.exec("ALTER TABLE t ADD COLUMN extra TEXT");
    wait_until(REPLICATION_TIMEOUT, "the row to arrive", || {
        b.query_i64("SELECT count(*) FROM t") == 1
    });
    wait_until(REPLICATION_TIMEOUT, "own events to come back", || {
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
    });
    assert_eq!(
        a.query_text("SELECT extra FROM t WHERE id = 1"),
        Some("kept".into())
    );
}

/// Finding 9: two nodes sharing a node id (cloned machines) had their message ids collide; the
/// server dropped one node's changes as duplicates and nothing was logged. The second one now
/// refuses to start, naming the problem; once the first is gone, its id can be reused.
#[test]
fn a_second_live_node_with_the_same_node_id_is_refused() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)";
    let mut a = Node::new(7, &nats.url, schema, 1, "");
    let mut b = Node::new(7, &nats.url, schema, 1, "");
    let mut c = Node::new(8, &nats.url, schema, 1, "");
    a.start();
    c.start();
    let (code, out) = run_to_exit(&b.config, &[], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("another live node uses node_id 7"), "{out}");
    // Node 7 of another cluster (its own streams) on the same server is not a duplicate, and
    // does not stop this cluster's node 7.
    let mut other = Node::new(7, &nats.url, schema, 1, "");
    other.edit_config(
        "[nats]\n",
        // The default prefix with '_' for '-': a distinct cluster, so a distinct lease key.
        "[nats]\nstream_prefix = \"harmonylite_changes\"\nsubject_prefix = \"other-changes\"\n",
    );
    other.start();
    other.exec("INSERT INTO t VALUES (99, 'other cluster')");
    assert!(other.terminate().success());
    a.exec("INSERT INTO t VALUES (1, 'a')");
    assert!(a.terminate().success());
    // Both databases' changes reach the third node: their message ids differ.
    b.start();
    b.exec("INSERT INTO t VALUES (2, 'b')");
    wait_until(REPLICATION_TIMEOUT, "both rows on node 8", || {
        c.query_i64("SELECT count(*) FROM t") == 2
    });
}

/// Issue 25 item 7: a node that starts while the lease bucket is unusable (here: denied to its
/// NATS user) runs without the duplicate check, and takes the lease once it can: the check is
/// not skipped for good.
#[test]
fn a_lease_unusable_at_start_is_taken_later() {
    let bin = require_nats!();
    let users = |deny: &str| {
        format!(
            "authorization {{ users: [ {{ user: \"hl\", password: \"pw\", \
             permissions: {{ publish: {{ allow: \">\", deny: [\"{deny}\"] }} }} }} ] }}"
        )
    };
    let mut nats =
        NatsServer::start_with(&bin, &users("$JS.API.STREAM.*.KV_harmonylite-node-leases"));
    let (schema, creds) = (
        "CREATE TABLE t (id INTEGER PRIMARY KEY)",
        "user_name = \"hl\"\nuser_password = \"pw\"",
    );
    let mut a = Node::new(7, &nats.url, schema, 1, "");
    a.edit_config("[nats]\n", &format!("[nats]\n{creds}\n"));
    a.start();
    wait_until(Duration::from_secs(60), "a start without the lease", || {
        a.log()
            .contains("running without the duplicate node_id check")
    });
    nats.reload(&users("nothing.denied"));
    wait_until(Duration::from_secs(90), "the lease taken later", || {
        a.log().contains("Took the node-id lease")
    });
    let b = Node::new(7, &nats.url, schema, 1, "");
    b.edit_config("[nats]\n", &format!("[nats]\n{creds}\n"));
    let (code, out) = run_to_exit(&b.config, &[], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
}

/// Finding 10: nodes configured with different shard counts silently lost the rows of the
/// shards one of them did not consume.
#[test]
fn a_shard_count_that_disagrees_with_the_streams_is_refused() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)";
    let mut a = Node::new(1, &nats.url, schema, 3, "");
    a.start();
    a.exec("INSERT INTO t VALUES (1, 'x')");
    let b = Node::new(2, &nats.url, schema, 2, "");
    let (code, out) = run_to_exit(&b.config, &[], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("replication_log.shards = 2"), "{out}");
}

/// Finding 12: a table that cannot be watched (no primary key and a column named rowid) made
/// the node exit — a restart loop under systemd. It is skipped with a warning.
#[test]
fn an_unwatchable_table_is_skipped_with_a_warning() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE odd (rowid TEXT, v TEXT); CREATE TABLE t (id INTEGER PRIMARY KEY)",
        1,
        "",
    );
    assert!(a.log().contains("Table skipped"), "{}", a.log());
    assert!(a.log().contains("odd"), "{}", a.log());
    a.exec("INSERT INTO t VALUES (1)");
    converge(&a, &b, "SELECT id FROM t", |r| r.len() == 1);
    // Once per table, although the start-up reads the table list several times.
    assert_eq!(a.log().matches("Table skipped").count(), 1, "{}", a.log());
}

/// Finding 13: `-cleanup` under a running daemon broke capture silently. It is refused, and so
/// is a second daemon on the same database.
#[test]
fn cleanup_and_a_second_daemon_refuse_while_one_runs() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let a = solo(&nats);
    let (code, out) = run_to_exit(&a.config, &["-cleanup"], Duration::from_secs(20));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("another harmonylite process"), "{out}");
    let (code, out) = run_to_exit(&a.config, &[], Duration::from_secs(20));
    assert_eq!(code, Some(2), "{out}");
    // Capture is intact.
    assert!(a.query_i64("SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'") >= 3);
}

/// Finding 14: tiny compressed messages expanding to hundreds of MiB drove memory to 1.3 GB.
#[test]
fn compressed_bombs_are_quarantined_without_blowing_up_memory() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        1,
        "",
    );
    let bomb = harmonylite::wire::Compressor::new()
        .and_then(|mut c| c.compress(&vec![0u8; 200 * 1024 * 1024]))
        .expect("compress");
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let url = nats.url.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        for _ in 0..4 {
            js.publish("harmonylite-change-log-1", bomb.clone().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    });
    wait_until(REPLICATION_TIMEOUT, "bombs to be quarantined", || {
        b.query_i64("SELECT count(*) FROM __harmonylite__dead_letter") == 4
    });
    for node in [&a, &b] {
        let pid = node.pid().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let hwm_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        assert!(hwm_kb < 200 * 1024, "peak RSS {hwm_kb} kB");
    }
    a.exec("INSERT INTO t VALUES (1, 'still replicating')");
    converge(&a, &b, "SELECT * FROM t", |r| r.len() == 1);
}

/// Finding 15: with its database file deleted, the daemon kept applying into the unlinked file
/// and reported healthy. It stops with a clear error.
#[test]
fn a_deleted_database_file_stops_the_node() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut a = solo(&nats);
    std::fs::remove_file(&a.db).expect("delete db");
    let status = a.wait_exit(Duration::from_secs(20)).expect("node exits");
    assert_eq!(status.code(), Some(1), "{}", a.log());
    assert!(a.log().contains("was deleted"), "{}", a.log());
}

/// Finding 18 / I6: an application on one node using deferred read-then-write transactions
/// (Django's default) got `database is locked` from the daemon's own-event applies.
#[test]
fn deferred_application_transactions_never_fail_on_a_single_writer_node() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, v TEXT)",
        2,
        "",
    );
    let conn = Connection::open(&a.db).expect("app");
    conn.busy_timeout(Duration::from_secs(5)).expect("timeout");
    let mut failures = Vec::new();
    for i in 0..400i64 {
        let r = (|| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN")?;
            let n: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
            // The read-to-write gap of an ORM building its statement.
            std::thread::sleep(Duration::from_millis(2));
            conn.execute(
                "INSERT OR REPLACE INTO t VALUES (?1, ?2, 'v')",
                rusqlite::params![i % 50, n],
            )?;
            conn.execute_batch("COMMIT")
        })();
        if let Err(e) = r {
            failures.push(format!("{i}: {e}"));
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    assert!(
        failures.is_empty(),
        "application transactions failed: {failures:?}"
    );
    converge(&a, &b, "SELECT * FROM t ORDER BY id", |r| r.len() == 50);
}

/// Finding 8: a crash between PubAck and marking, and a restart after JetStream's duplicate
/// window, resent the changes and rolled back newer writes other nodes made meanwhile.
#[test]
fn resends_after_a_crash_never_replay_old_changes() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    // The stream keeps Go's configuration except a 1 s duplicate window instead of 2 minutes, so
    // the test does not have to wait that long.
    let url = nats.url.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "harmonylite-changes-c-1".into(),
            subjects: vec!["harmonylite-change-log-1".into()],
            max_messages: 100_000,
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("stream");
    });
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)";
    let mut a = Node::new(1, &nats.url, schema, 1, "");
    // Node 1 never retires what it published: everything stays pending in its database, as
    // after a crash right after the acks.
    let text = std::fs::read_to_string(&a.config).expect("config");
    std::fs::write(
        &a.config,
        text.replace("cleanup_interval = 1000", "cleanup_interval = 3600000"),
    )
    .expect("config");
    let mut b = Node::new(2, &nats.url, schema, 1, "");
    a.start();
    b.start();
    a.exec(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
         INSERT INTO t SELECT i, 'old' FROM n",
    );
    wait_until(REPLICATION_TIMEOUT, "the rows to arrive", || {
        b.query_i64("SELECT count(*) FROM t") == 200
    });
    a.kill();
    assert_eq!(
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global"),
        200,
        "the changes are still pending on node 1"
    );
    b.exec("UPDATE t SET v = 'new'");
    let window = Instant::now();
    wait_until(REPLICATION_TIMEOUT, "the duplicate window to pass", || {
        window.elapsed() > Duration::from_millis(1500)
    });
    a.start();
    wait_until(REPLICATION_TIMEOUT, "node 1 to catch up", || {
        a.query_i64("SELECT count(*) FROM t WHERE v = 'new'") == 200
    });
    wait_until(
        REPLICATION_TIMEOUT,
        "node 1 to publish its pending changes",
        || a.log().contains("Pending changes already in the stream"),
    );
    // Give a wrong resend every chance to show up before checking.
    b.exec("INSERT INTO t VALUES (1000, 'marker')");
    wait_until(REPLICATION_TIMEOUT, "the marker", || {
        a.query_i64("SELECT count(*) FROM t WHERE id = 1000") == 1
    });
    assert_eq!(b.query_i64("SELECT count(*) FROM t WHERE v = 'new'"), 200);
    assert_eq!(a.query_i64("SELECT count(*) FROM t WHERE v = 'new'"), 200);
}

/// Finding 11: with the JetStream store wiped, the publisher retried "no stream found" forever,
/// and after a restart consumers started at their old sequence on the new stream and skipped
/// its messages.
#[test]
fn wiped_streams_are_recreated_and_read_from_their_start() {
    let bin = require_nats!();
    let mut nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)";
    let (a, mut b) = pair(&nats, schema, 1, "");
    for i in 0..20 {
        a.exec(&format!("INSERT INTO t VALUES ({i}, 'before')"));
    }
    converge(&a, &b, "SELECT * FROM t ORDER BY id", |r| r.len() == 20);
    b.kill();
    nats.stop();
    std::fs::remove_dir_all(nats.dir().join("js")).expect("wipe JetStream store");
    nats.restart();
    // The running node recreates the stream and publishes; the restarted one reads it from 1.
    a.exec("INSERT INTO t VALUES (100, 'after')");
    wait_until(REPLICATION_TIMEOUT, "node 1 to recreate the stream", || {
        a.log().contains("missing; recreating")
    });
    b.start();
    a.exec("INSERT INTO t VALUES (101, 'after')");
    converge(&a, &b, "SELECT * FROM t ORDER BY id", |r| r.len() == 22);
    assert!(b.log().contains("consuming from its start"), "{}", b.log());
}

/// Issue 25, item 4: all of JetStream lost under two running nodes (streams and buckets wiped,
/// the server restarted). Both keep writing; their changes must leave them and converge, and
/// snapshot leadership and the positions bucket must come back.
#[test]
fn a_wiped_jetstream_under_running_nodes_recovers_by_itself() {
    let bin = require_nats!();
    let mut nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)";
    let mut a = Node::new(1, &nats.url, schema, 2, "");
    let mut b = Node::new(2, &nats.url, schema, 2, "");
    // A window smaller than what was published before: marks of the old streams must not pace
    // publishing to the new ones for good.
    for node in [&mut a, &mut b] {
        node.set_max_entries(64);
        node.start();
    }
    for i in 0..300 {
        let node = if i % 2 == 0 { &a } else { &b };
        node.exec(&format!("INSERT INTO t VALUES ({i}, 'before')"));
    }
    converge(&a, &b, "SELECT * FROM t ORDER BY id", |r| r.len() == 300);
    nats.stop();
    std::fs::remove_dir_all(nats.dir().join("js")).expect("wipe JetStream store");
    nats.restart();
    for i in 1000..1020 {
        let node = if i % 2 == 0 { &a } else { &b };
        node.exec(&format!("INSERT INTO t VALUES ({i}, 'after')"));
    }
    converge(&a, &b, "SELECT * FROM t ORDER BY id", |r| r.len() == 320);
    for node in [&a, &b] {
        wait_until(REPLICATION_TIMEOUT, "nothing pending", || {
            node.query_i64("SELECT count(*) FROM __harmonylite__t_change_log WHERE state = 0") == 0
        });
    }
    // Snapshot leadership is taken again on the new server.
    wait_until(
        REPLICATION_TIMEOUT,
        "a snapshot leader after the wipe",
        || {
            let after = |n: &Node| {
                n.log()
                    .split("missing; recreating")
                    .nth(1)
                    .map(|l| l.contains("Became snapshot leader"))
            };
            after(&a) == Some(true) || after(&b) == Some(true)
        },
    );
    // So do the position reports (flow control), in a bucket created again.
    wait_until(
        REPLICATION_TIMEOUT,
        "position reports after the wipe",
        // Every reporter that failed works again (one that never failed: the other recreated
        // the bucket before its next report).
        || {
            let (failed, back) = (
                "Cannot report applied positions",
                "Position reports work again",
            );
            let logs = [a.log(), b.log()];
            logs.iter().any(|l| l.contains(back))
                && logs.iter().all(|l| !l.contains(failed) || l.contains(back))
        },
    );
    // What the wipe took is said: the writers' acked changes went with the old streams.
    assert!(
        [&a, &b]
            .iter()
            .any(|n| n.log().contains("The lost stream held this node's changes")),
        "{}",
        a.log()
    );
    // And the schema registry, within seconds (it waited a minute-long refresh, then more).
    wait_until(
        REPLICATION_TIMEOUT,
        "both nodes in the registry again",
        || {
            let args = ["-schema-status-cluster"];
            let (code, out) = run_to_exit(&a.config, &args, Duration::from_secs(20));
            code == Some(0) && out.contains("Total Nodes: 2\n")
        },
    );
}

/// Findings 16 and 17: a full disk made the apply thread give up and the process exit 0 (a
/// graceful stop to systemd), and log lines dropped the cause. Now the node stops with exit 1,
/// naming the subsystem and the SQLite cause.
#[test]
fn a_full_disk_stops_the_node_with_a_failure_naming_the_cause() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)";
    let mut a = Node::new(1, &nats.url, schema, 1, "");
    let mut b = Node::new(2, &nats.url, schema, 1, "");
    b.file_size_limit = Some(2 * 1024 * 1024);
    a.start();
    b.start();
    for i in 0..40 {
        a.exec(&format!("INSERT INTO t VALUES ({i}, randomblob(100000))"));
    }
    let status = b.wait_exit(Duration::from_secs(60)).expect("node 2 stops");
    assert_eq!(status.code(), Some(1), "{}", b.log());
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("failed"))
        .unwrap_or_else(|| panic!("no failure line\n{log}"));
    assert!(
        ["apply thread", "change-log keeper", "publisher"]
            .iter()
            .any(|s| line.contains(s)),
        "{line}"
    );
    assert!(
        line.contains("disk") || line.contains("full") || line.contains("I/O"),
        "the SQLite cause is missing: {line}"
    );
}

/// Finding 16: a retried apply failure logs its cause (`database is locked`), not a bare
/// `sqlite error`.
#[test]
fn retried_apply_failures_log_their_cause() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, b) = pair(
        &nats,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        1,
        "",
    );
    let blocker = b.conn();
    blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    a.exec("INSERT INTO t VALUES (1, 'x')");
    wait_until(Duration::from_secs(30), "the retry to be logged", || {
        b.log().contains("Cannot apply batch; retrying")
    });
    blocker.execute_batch("COMMIT").expect("unlock");
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("Cannot apply batch; retrying"))
        .expect("line");
    assert!(line.contains("database is locked"), "{line}");
    converge(&a, &b, "SELECT * FROM t", |r| r.len() == 1);
}

/// I2's limit: two nodes giving one UNIQUE value to two different rows at the same time. Neither
/// node deletes its application's row; each holds the other's event, logs both rows, and the
/// conflict resolves by itself once one of the rows changes.
#[test]
fn concurrent_unique_claims_are_held_logged_and_resolve_when_a_row_changes() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let (a, mut b) = pair(
        &nats,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE)",
        2,
        "",
    );
    b.kill();
    a.exec("INSERT INTO users VALUES (1, 'same@example.com')");
    b.exec("INSERT INTO users VALUES (2, 'same@example.com')");
    b.start();
    wait_until(
        REPLICATION_TIMEOUT,
        "both nodes to hold the other's row",
        || {
            a.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 1
                && b.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 1
        },
    );
    for node in [&a, &b] {
        assert_eq!(
            node.query_i64("SELECT count(*) FROM users"),
            1,
            "nothing deleted"
        );
        let log = node.log();
        let line = log
            .lines()
            .find(|l| l.contains("UNIQUE conflict with another row"))
            .unwrap_or_else(|| panic!("no conflict line\n{log}"));
        assert!(
            line.contains("id: 1") && line.contains("id: 2"),
            "both rows: {line}"
        );
    }
    b.exec("UPDATE users SET email = 'other@example.com' WHERE id = 2");
    converge(&a, &b, "SELECT id, email FROM users ORDER BY id", |r| {
        r == [
            "integer:1|text:same@example.com",
            "integer:2|text:other@example.com",
        ]
    });
    wait_until(REPLICATION_TIMEOUT, "the held events to go", || {
        a.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 0
            && b.query_i64("SELECT count(*) FROM __harmonylite__held_events") == 0
    });
}

/// I5: capture triggers dropped behind the daemon's back (not by -cleanup) would silently stop
/// replication of that table. The node reinstalls them at once, says so, and keeps running.
/// Dropping a watched table (triggers go with it) is not such an error.
#[test]
fn dropped_capture_triggers_are_reinstalled_online() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE u (id INTEGER PRIMARY KEY)";
    let (a, b) = pair(&nats, schema, 1, "");
    a.exec("DROP TRIGGER __harmonylite__t_change_log_on_insert");
    wait_until(REPLICATION_TIMEOUT, "the trigger to be reinstalled", || {
        a.query_i64("SELECT count(*) FROM sqlite_schema WHERE name = '__harmonylite__t_change_log_on_insert'") == 1
    });
    assert!(
        a.log()
            .contains("capture triggers of table \"t\" were dropped"),
        "{}",
        a.log()
    );
    a.exec("DROP TABLE u");
    a.exec("INSERT INTO t VALUES (1)");
    converge(&a, &b, "SELECT id FROM t", |r| r.len() == 1);
    assert!(
        a.pid().is_some() && a.log().matches("Replication running").count() == 1,
        "{}",
        a.log()
    );
}
