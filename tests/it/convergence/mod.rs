//! The seeded randomized convergence test (testing-invariants.md): three nodes on a real
//! nats-server, random workloads of every key kind and storage class, faults on a schedule drawn
//! from the seed, and after quiescence a comparison of every node against a model of what the
//! applications committed.
//!
//! Checked:
//! - I1 while it happens: before a writer touches one of its rows again, the row must still hold
//!   what it last committed there (a change means replication rewrote the application's data).
//! - I1–I3 after quiescence: every node equals the model, cell by cell, storage class included;
//!   shared rows written by several nodes are equal on every node.
//! - I6: in single-writer phases (one node's application writes, the others are idle) no
//!   deferred read-then-write transaction may fail.
//! - Nothing quarantined, nothing left held; every node's FTS index (kept by application triggers)
//!   passes its integrity check; rows written by triggers (`audit`) and with auto ids (`people`,
//!   every node at once) are equal everywhere.
//! - Schema changes on running nodes: during the concurrent phase a migration (a new column, a
//!   new table with a foreign key and an index, a column rename) is applied by the application
//!   to each node in turn, at moments drawn from the seed, and the new column and table are
//!   written on migrated nodes; afterwards the shared and the new tables are equal everywhere.
//!
//! - Files handled by operators: a node's file restored from an older backup, and a copy of a
//!   stopped node's file (with changes pending) started as a new node, both must converge
//!   without resending old changes (phase 1c, [`ops::file_phase`]).
//! - Operations (phase 1d, with faults on, [`ops::operations_phase`]): all of JetStream wiped
//!   under the running nodes, the snapshot leader killed during writes, and a node whose
//!   application writes while its daemon is down (stopped or killed) for longer than the streams
//!   keep in the small-retention test: every node converges and keeps every committed row.
//!
//! A second test runs the same workload on streams that keep only a few dozen messages, so that
//! nodes killed or stopped by the faults — and one node stopped on purpose — must recover from
//! snapshots (checked: it logged a restore).
//!
//! Knobs (environment): `HARMONYLITE_SEED=N` replays one seed; `HARMONYLITE_SEEDS=N` runs N
//! random seeds; `HARMONYLITE_ROUNDS=N` transactions per phase (default 12);
//! `HARMONYLITE_FAULTS=0` turns faults off; `HARMONYLITE_SHARDS=N` forces the shard count;
//! `HARMONYLITE_DDL=0` leaves the schema alone; `HARMONYLITE_LOG_DIR=dir` keeps the nodes' logs
//! of a seed that did not converge there.
//! Every failure message starts with the seed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::require_nats;
use crate::support::{NatsServer, Node, happens_within};

mod ops;
mod writer;
use writer::Writer;

/// splitmix64: small, seedable, good enough to drive choices.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

const SCHEMA: &str = "
    CREATE TABLE ints (id INTEGER PRIMARY KEY, u TEXT UNIQUE, n INTEGER, v ANY);
    CREATE TABLE strs (k TEXT PRIMARY KEY, v TEXT, d DATETIME, b BOOLEAN);
    CREATE TABLE comp (a TEXT, b INTEGER, v BLOB, PRIMARY KEY (a, b)) WITHOUT ROWID;
    CREATE TABLE norow (v TEXT, n REAL);
    CREATE TABLE strict (id INTEGER PRIMARY KEY, v ANY) STRICT;
    CREATE TABLE shared (id INTEGER PRIMARY KEY, v TEXT, n INTEGER);
    CREATE TABLE names (k TEXT PRIMARY KEY COLLATE NOCASE, v TEXT);
    CREATE TABLE loose (k PRIMARY KEY, v TEXT);
    CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT);
    CREATE TABLE audit (id TEXT PRIMARY KEY DEFAULT (lower(hex(randomblob(16)))), k, what TEXT);
    CREATE VIRTUAL TABLE strs_fts USING fts5(v, content='strs', content_rowid='rowid');
    CREATE TRIGGER strs_ai AFTER INSERT ON strs BEGIN
        INSERT INTO strs_fts(rowid, v) VALUES (new.rowid, new.v);
        INSERT INTO audit(k, what) VALUES (new.k, 'insert');
    END;
    CREATE TRIGGER strs_ad AFTER DELETE ON strs BEGIN
        INSERT INTO strs_fts(strs_fts, rowid, v) VALUES ('delete', old.rowid, old.v);
    END;
    CREATE TRIGGER strs_au AFTER UPDATE OF v ON strs BEGIN
        INSERT INTO strs_fts(strs_fts, rowid, v) VALUES ('delete', old.rowid, old.v);
        INSERT INTO strs_fts(rowid, v) VALUES (new.rowid, new.v);
        UPDATE strs SET b = coalesce(b, 0) + 1 WHERE k IS new.k;
    END;";

/// Tables written outside the model whose rows must still be equal on every node: the
/// concurrent ones (`shared`, auto-id `people`) and what triggers write (`audit`).
const UNMODELLED: [&str; 3] = ["shared", "people", "audit"];

/// Tables whose rows each belong to one writer, with their key columns and all columns.
const OWNED: [(&str, &str, &str); 7] = [
    ("ints", "id", "id, u, n, v"),
    ("strs", "k", "k, v, d, b"),
    ("comp", "a, b", "a, b, v"),
    ("norow", "rowid", "rowid, v, n"),
    ("strict", "id", "id, v"),
    // A case-insensitive key (re-spelled by the writer) and an untyped one (1 and 1.0).
    ("names", "k", "k, v"),
    ("loose", "k", "k, v"),
];

type Row = Vec<Value>;
type Key = (usize, Vec<Value>);

/// What the applications committed: (table index, key) → row, plus every value a key ever had
/// (to say whether a changed row shows an older value of its own writer).
#[derive(Default)]
struct Model {
    rows: BTreeMap<String, Row>,
    history: HashMap<String, Vec<Row>>,
}

fn key_id(k: &Key) -> String {
    format!("{}:{:?}", OWNED[k.0].0, k.1)
}

impl Model {
    fn set(&mut self, k: &Key, row: Option<Row>) {
        let id = key_id(k);
        match row {
            Some(r) => {
                self.history.entry(id.clone()).or_default().push(r.clone());
                self.rows.insert(id, r);
            }
            None => {
                self.rows.remove(&id);
            }
        }
    }
}

fn read_row(conn: &Connection, k: &Key) -> rusqlite::Result<Option<Row>> {
    let (table, keys, cols) = OWNED[k.0];
    let conds: Vec<String> = keys
        .split(", ")
        .enumerate()
        .map(|(i, c)| format!("{c} IS ?{}", i + 1))
        .collect();
    let sql = format!("SELECT {cols} FROM {table} WHERE {}", conds.join(" AND "));
    let mut stmt = conn.prepare_cached(&sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(k.1.iter()))?;
    match rows.next()? {
        Some(r) => Ok(Some(
            (0..n)
                .map(|i| r.get::<_, Value>(i))
                .collect::<Result<_, _>>()?,
        )),
        None => Ok(None),
    }
}

fn table_rows(conn: &Connection, t: usize) -> Vec<(String, Row)> {
    let (table, keys, cols) = OWNED[t];
    let nkeys = keys.split(", ").count();
    let sql = format!("SELECT {cols} FROM {table}");
    let mut stmt = conn.prepare(&sql).expect(&sql);
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            let row: Row = (0..n)
                .map(|i| r.get::<_, Value>(i))
                .collect::<Result<_, _>>()?;
            Ok((key_id(&(t, row[..nkeys].to_vec())), row))
        })
        .expect(&sql);
    let mut out: Vec<(String, Row)> = rows.collect::<Result<_, _>>().expect(&sql);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A random value of any storage class, with the values that trip affinity up.
fn any_value(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => Value::Null,
        1 => Value::Integer(i64::MIN),
        2 => Value::Integer(i64::MAX),
        3 => Value::Integer(rng.next() as i64 >> rng.below(60)),
        4 => Value::Real(1.0),
        5 => Value::Real((rng.next() as f64) / 7.0),
        6 => Value::Text("00123".into()),
        7 => Value::Text("1e3".into()),
        8 => Value::Text(format!("tëxt\u{0}nul {}", rng.below(1000))),
        9 => Value::Blob(Vec::new()),
        10 => Value::Blob((0..rng.below(40)).map(|_| rng.next() as u8).collect()),
        _ => Value::Text("2025-03-01 12:00:00.123".into()),
    }
}

/// The migration of the DDL phase (applied to each node by its application, while it runs).
const MIGRATION: &str = "
    ALTER TABLE shared ADD COLUMN extra TEXT;
    CREATE TABLE notes (id INTEGER PRIMARY KEY, shared_id INTEGER REFERENCES shared(id), body TEXT);
    CREATE INDEX notes_by_shared ON notes(shared_id);
    ALTER TABLE shared RENAME COLUMN extra TO note;";

/// The DDL phase: migrates the nodes one at a time (order and pauses from the seed), then
/// writes the new column and table on migrated nodes until `stop`.
fn migrate_nodes(
    dbs: Vec<std::path::PathBuf>,
    mut rng: Rng,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut order: Vec<usize> = (0..dbs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let conns: Vec<Connection> = dbs
        .iter()
        .map(|db| {
            let c = Connection::open(db).expect("ddl db");
            c.busy_timeout(Duration::from_secs(10)).expect("timeout");
            c
        })
        .collect();
    let mut migrated: Vec<usize> = Vec::new();
    let write = |rng: &mut Rng, migrated: &[usize]| {
        if migrated.is_empty() {
            return;
        }
        let n = migrated[rng.below(migrated.len() as u64) as usize];
        let c = &conns[n];
        let shared_id = rng.below(30) as i64;
        let _ = match rng.below(3) {
            0 => c.execute(
                "UPDATE shared SET note = ?2 WHERE id = ?1",
                rusqlite::params![shared_id, format!("note {}", rng.next())],
            ),
            1 => c.execute(
                "INSERT INTO notes (id, shared_id, body) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                rusqlite::params![
                    rng.below(40) as i64,
                    shared_id,
                    format!("body {}", rng.next())
                ],
            ),
            _ => c.execute("DELETE FROM notes WHERE id = ?1", [rng.below(40) as i64]),
        };
    };
    for n in order {
        let pause = Instant::now() + Duration::from_millis(100 + rng.below(900));
        while Instant::now() < pause {
            write(&mut rng, &migrated);
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut tries = 0;
        loop {
            tries += 1;
            match conns[n].execute_batch(&format!("BEGIN IMMEDIATE; {MIGRATION} COMMIT;")) {
                Ok(()) => break,
                Err(e) if tries < 20 => {
                    let _ = conns[n].execute_batch("ROLLBACK");
                    eprintln!(
                        "seed {seed}: migration of node {} failed ({e}); retrying",
                        n + 1
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("seed {seed}: cannot migrate node {}: {e}", n + 1),
            }
        }
        eprintln!("seed {seed}: node {} migrated", n + 1);
        migrated.push(n);
    }
    while !stop.load(Ordering::Relaxed) {
        write(&mut rng, &migrated);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every row of `table` on `n` (empty when it does not exist).
fn all_rows(n: &Node, table: &str) -> Vec<Vec<Value>> {
    let conn = n.conn();
    let Ok(mut stmt) = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1")) else {
        return Vec::new();
    };
    let cols = stmt.column_count();
    stmt.query_map([], |r| (0..cols).map(|i| r.get::<_, Value>(i)).collect())
        .expect(table)
        .collect::<Result<_, _>>()
        .expect(table)
}

/// Faults drawn from the seed, applied between transactions of a phase.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillNode(usize),
    StopNode(usize),
    RestartNats,
}

struct Cluster {
    nats: NatsServer,
    nodes: Vec<Node>,
    stopped: Vec<Option<u32>>,
}

impl Cluster {
    fn heal(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(pid) = self.stopped[i].take() {
                signal(pid, "CONT");
            }
            if node.pid().is_none() {
                node.start();
            }
        }
    }

    fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::KillNode(i) => {
                if let Some(pid) = self.stopped[i].take() {
                    signal(pid, "CONT");
                }
                self.nodes[i].kill();
            }
            Fault::StopNode(i) => {
                if let (Some(pid), None) = (self.nodes[i].pid(), self.stopped[i]) {
                    signal(pid, "STOP");
                    self.stopped[i] = Some(pid);
                }
            }
            Fault::RestartNats => {
                self.nats.stop();
                self.nats.restart();
            }
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Waits until nothing is pending anywhere and all nodes hold the same rows.
fn settle(cluster: &Cluster, seed: u64) {
    let sum = |n: &Node| -> String {
        OWNED
            .iter()
            .map(|(t, ..)| *t)
            .chain(UNMODELLED)
            .map(|t| n.checksum(t))
            .collect::<Vec<_>>()
            .join(",")
    };
    let ok = happens_within(Duration::from_secs(120), || {
        cluster.nodes.iter().all(|n| {
            n.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
                && sum(n) == sum(&cluster.nodes[0])
        })
    });
    assert!(ok, "seed {seed}: the cluster did not settle between phases");
}

/// Node `id` of a seed's cluster (`max_entries`: see [`run_seed`]).
fn new_node(id: u64, url: &str, schema: &str, shards: u64, max_entries: Option<u64>) -> Node {
    let n = Node::new(id, url, schema, shards, "");
    if let Some(m) = max_entries {
        n.set_max_entries(m);
        // A dead leader is replaced in seconds, so recoveries do not wait 30 s for it.
        n.append_config("[snapshot]\nleader_ttl = 3000");
    }
    n
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs one seed; panics (with the seed first) on any violation. `max_entries`: stream
/// retention (small values force recoveries from snapshots).
fn run_seed(bin: &std::path::Path, seed: u64, shards: u64, max_entries: Option<u64>) {
    let mut rng = Rng(seed);
    let rounds = env_u64("HARMONYLITE_ROUNDS").unwrap_or(12);
    let faults_on = env_u64("HARMONYLITE_FAULTS") != Some(0);
    eprintln!("convergence: seed {seed}, shards {shards}, {rounds} rounds per phase");
    let nats = NatsServer::start(bin);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| new_node(id, &nats.url, SCHEMA, shards, max_entries))
        .collect();
    for n in &mut nodes {
        n.start();
    }
    let mut cluster = Cluster {
        nats,
        nodes,
        stopped: vec![None; 3],
    };
    let model = Arc::new(Mutex::new(Model::default()));
    let mut writers: Vec<Writer> = (0..3)
        .map(|w| Writer::new(w, &cluster.nodes[w].db, rng.fork(), Arc::clone(&model)))
        .collect();

    let draw_fault = |rng: &mut Rng| -> Option<Fault> {
        if !faults_on || !rng.chance(12) {
            return None;
        }
        Some(match rng.below(3) {
            0 => Fault::KillNode(rng.below(3) as usize),
            1 => Fault::StopNode(rng.below(3) as usize),
            _ => Fault::RestartNats,
        })
    };

    // Phase 1: single-writer phases, one node at a time (I6: nothing may fail), with idle
    // pauses and faults.
    for (w, writer) in writers.iter_mut().enumerate() {
        // Single-writer means this node receives nothing: let the previous phase settle first.
        settle(&cluster, seed);
        for round in 0..rounds {
            if let Some(f) = draw_fault(&mut rng) {
                eprintln!("seed {seed}: fault {f:?} before round {round} of writer {w}");
                cluster.inject(f);
            }
            if rng.chance(15) {
                cluster.heal();
            }
            let mut result = writer.transaction(seed, 40);
            if result
                .as_ref()
                .is_err_and(|e| e.contains("database is locked"))
                && cluster.stopped[w].is_some()
            {
                // The fault froze this node's daemon (SIGSTOP) inside one of its short write
                // transactions: the lock is the frozen process's, not something the daemon did.
                eprintln!(
                    "seed {seed}: node {}'s daemon was frozen holding the lock",
                    w + 1
                );
                cluster.heal();
                result = writer.transaction(seed, 40);
            }
            if let Err(e) = result {
                let log = cluster.nodes[w].log();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                panic!(
                    "seed {seed}: I6 violated: node {}'s application transaction failed in a single-writer phase: {e}\nthe node's last log lines, newest first:\n{}",
                    w + 1,
                    tail.join("\n")
                );
            }
            if rng.chance(10) {
                let pause = Duration::from_millis(rng.below(3000));
                let start = Instant::now();
                while start.elapsed() < pause {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        cluster.heal();
    }

    // Phase 1b (small retention only): node 3 is down while node 1 writes more than the streams
    // keep; on restart it must recover from a snapshot.
    if let Some(m) = max_entries {
        settle(&cluster, seed);
        cluster.nodes[2].kill();
        let before = cluster.nodes[2].log().matches("Restore complete").count();
        let captured = |n: &Node| {
            n.query_i64(
                "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = '__harmonylite___change_log_global'",
            )
        };
        let start = captured(&cluster.nodes[0]);
        while captured(&cluster.nodes[0]) - start < (2 * m * shards) as i64 {
            if let Err(e) = writers[0].transaction(seed, 40) {
                panic!("seed {seed}: I6 violated while node 3 was down: {e}");
            }
        }
        // All of it in the streams (published and retired), so they have moved on.
        let published = happens_within(Duration::from_secs(60), || {
            cluster.nodes[0].query_i64("SELECT count(*) FROM __harmonylite___change_log_global")
                == 0
        });
        assert!(published, "seed {seed}: node 1 did not publish its writes");
        cluster.nodes[2].start();
        settle(&cluster, seed);
        // The rows are equal once the restore has committed; its log line follows a moment later.
        let restored = happens_within(Duration::from_secs(10), || {
            cluster.nodes[2].log().matches("Restore complete").count() > before
        });
        assert!(
            restored,
            "seed {seed}: node 3 came back after the streams moved on but did not restore a snapshot\n{}",
            cluster.nodes[2].log()
        );
    }

    ops::file_phase(&mut cluster, &mut writers, seed, shards, max_entries);
    if faults_on {
        let small = max_entries.is_some();
        ops::operations_phase(&mut cluster, &mut writers, seed, &mut rng, small);
    }

    // Phase 2: every node's application writes its own rows at the same time (I1 checked live;
    // a transaction may fail on SQLITE_BUSY here, since foreign changes arrive — it is retried),
    // while the DDL phase migrates the nodes one by one.
    let ddl_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ddl_on = env_u64("HARMONYLITE_DDL") != Some(0);
    let ddl = ddl_on.then(|| {
        let dbs: Vec<_> = cluster.nodes.iter().map(|n| n.db.clone()).collect();
        let (rng, stop) = (rng.fork(), Arc::clone(&ddl_stop));
        std::thread::spawn(move || migrate_nodes(dbs, rng, seed, stop))
    });
    let handles: Vec<_> = writers
        .into_iter()
        .map(|mut wr| {
            std::thread::spawn(move || {
                let mut done = 0;
                let mut tries = 0;
                while done < rounds && tries < rounds * 20 {
                    tries += 1;
                    if wr.transaction(seed, 20).is_ok() {
                        done += 1;
                    }
                    // Shared rows: concurrent writes to the same rows from every node.
                    for _ in 0..3 {
                        let _ = wr.shared();
                    }
                    wr.person();
                }
                wr
            })
        })
        .collect();
    let mut writers: Vec<Writer> = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if faults_on && rng.chance(50) {
            let f = draw_fault(&mut rng).unwrap_or(Fault::KillNode(i));
            eprintln!("seed {seed}: fault {f:?} during the concurrent phase");
            cluster.inject(f);
            if let Fault::StopNode(n) = f {
                // Frozen inside one of its write transactions, a daemon holds the database's
                // lock: nothing there (the migration included) can write until it runs again.
                std::thread::sleep(Duration::from_millis(200 + rng.below(1800)));
                if let Some(pid) = cluster.stopped[n].take() {
                    signal(pid, "CONT");
                }
            }
        }
        match h.join() {
            Ok(w) => writers.push(w),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    if let Some(ddl) = ddl {
        ddl_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(panic) = ddl.join() {
            std::panic::resume_unwind(panic);
        }
    }
    cluster.heal();
    let emails: Vec<String> = writers.iter().flat_map(|w| w.emails.clone()).collect();
    drop(writers);

    // Quiescence: nothing pending anywhere, every node equal to the model and to each other.
    let model = model.lock().expect("model");
    let want: Vec<Vec<(String, Row)>> = (0..OWNED.len())
        .map(|t| {
            model
                .rows
                .iter()
                .filter(|(id, _)| id.starts_with(&format!("{}:", OWNED[t].0)))
                .map(|(id, r)| (id.clone(), r.clone()))
                .collect()
        })
        .collect();
    // Every column, the migration's included, and the migration's new table.
    let shared = |n: &Node| -> Vec<Vec<Row>> {
        UNMODELLED
            .iter()
            .chain(&["notes"])
            .map(|t| all_rows(n, t))
            .collect()
    };
    let converged = happens_within(Duration::from_secs(120), || {
        cluster.nodes.iter().all(|n| {
            let conn = n.conn();
            n.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
                && (0..OWNED.len()).all(|t| table_rows(&conn, t) == want[t])
                && shared(n) == shared(&cluster.nodes[0])
        })
    });
    if !converged {
        let mut report = String::new();
        for (i, n) in cluster.nodes.iter().enumerate() {
            let conn = n.conn();
            report.push_str(&format!(
                "node {}: pending {}\n",
                i + 1,
                n.query_i64("SELECT count(*) FROM __harmonylite___change_log_global")
            ));
            for (t, want_rows) in want.iter().enumerate() {
                let have = table_rows(&conn, t);
                if have != *want_rows {
                    let missing: Vec<_> = want_rows
                        .iter()
                        .filter(|r| !have.contains(r))
                        .take(5)
                        .collect();
                    let extra: Vec<_> = have
                        .iter()
                        .filter(|r| !want_rows.contains(r))
                        .take(5)
                        .collect();
                    report.push_str(&format!(
                        "  {}: {} rows, model {}; missing/different {missing:?}; unexpected {extra:?}\n",
                        OWNED[t].0,
                        have.len(),
                        want_rows.len()
                    ));
                }
            }
            if shared(n) != shared(&cluster.nodes[0]) {
                report.push_str("  shared, people, audit or notes rows differ from node 1\n");
            }
        }
        for (i, n) in cluster.nodes.iter().enumerate() {
            let log = n.log();
            if let Some(dir) = std::env::var_os("HARMONYLITE_LOG_DIR") {
                let _ = std::fs::write(
                    std::path::Path::new(&dir).join(format!("seed-{seed}-node{}.log", i + 1)),
                    &log,
                );
            }
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            let last: Vec<&str> = log.lines().rev().take(15).collect();
            report.push_str(&format!(
                "node {}'s last warnings and errors:\n{}\nits last lines, newest first:\n{}\n",
                i + 1,
                notable[notable.len().saturating_sub(25)..].join("\n"),
                last.join("\n")
            ));
        }
        panic!("seed {seed}: nodes did not converge to the model (I1-I3):\n{report}");
    }
    // Known gap (issue 24): with snapshot recoveries a lost auto-id row is still, rarely,
    // recorded nowhere (1 row in 4 seeds); `HARMONYLITE_CHECK_CONFLICTS=1` checks it there too.
    let conflicts_checked =
        max_entries.is_none() || env_u64("HARMONYLITE_CHECK_CONFLICTS") == Some(1);
    check_derived_state(&cluster, conflicts_checked.then_some(&emails[..]), seed);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let dead = n.query_i64("SELECT count(*) FROM __harmonylite__dead_letter");
        let held = n.query_i64("SELECT count(*) FROM __harmonylite__held_events");
        assert!(
            dead == 0 && held == 0,
            "seed {seed}: node {}: {dead} quarantined, {held} held\n{}",
            i + 1,
            n.log()
        );
    }
}

/// What replication must keep right beyond the rows: every node's FTS index matches its rows
/// (kept by application triggers that must run on replicas), and every person inserted with an
/// auto id is either there or, having lost its id to another node's, kept in some node's
/// `__harmonylite__conflicts`.
fn check_derived_state(cluster: &Cluster, emails: Option<&[String]>, seed: u64) {
    for (i, n) in cluster.nodes.iter().enumerate() {
        if let Err(e) = n
            .conn()
            .execute_batch("INSERT INTO strs_fts(strs_fts, rank) VALUES ('integrity-check', 1)")
        {
            panic!(
                "seed {seed}: node {}'s FTS index does not match its rows: {e}",
                i + 1
            );
        }
    }
    let present: std::collections::HashSet<String> = all_rows(&cluster.nodes[0], "people")
        .into_iter()
        .filter_map(|r| match r.get(1) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        })
        .collect();
    let lost: std::collections::HashSet<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| {
            let conn = n.conn();
            let mut stmt = conn
                .prepare(
                    "SELECT lost_row ->> 'email' FROM __harmonylite__conflicts \
                     WHERE table_name = 'people'",
                )
                .expect("conflicts");
            let rows: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .expect("conflicts")
                .collect::<Result<_, _>>()
                .expect("conflicts");
            rows
        })
        .collect();
    let Some(emails) = emails else { return };
    let vanished: Vec<&String> = emails
        .iter()
        .filter(|e| !present.contains(*e) && !lost.contains(*e))
        .collect();
    assert!(
        vanished.is_empty(),
        "seed {seed}: rows gone without a trace (neither in people nor in any node's conflicts): {vanished:?}"
    );
}

/// `HARMONYLITE_SEED` (one), `HARMONYLITE_SEEDS` (that many random ones), else `fixed`.
fn seeds_from_env(fixed: Vec<u64>) -> Vec<u64> {
    if let Some(seed) = env_u64("HARMONYLITE_SEED") {
        vec![seed]
    } else if let Some(n) = env_u64("HARMONYLITE_SEEDS") {
        let mut r = Rng(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64));
        (0..n).map(|_| r.next() % 1_000_000).collect()
    } else {
        fixed
    }
}

/// A few fixed seeds in CI (shards 1 and 3); more with `HARMONYLITE_SEEDS` or one with
/// `HARMONYLITE_SEED`.
#[test]
fn randomized_convergence() {
    let bin = require_nats!();
    let forced = env_u64("HARMONYLITE_SHARDS");
    for seed in seeds_from_env(vec![11, 2024, 7]) {
        let shards = forced.unwrap_or(if seed % 2 == 0 { 1 } else { 3 });
        run_seed(&bin, seed, shards, None);
    }
}

/// The same workload and faults on streams that keep 24 messages: recoveries from snapshots
/// at start and while running, under the same invariants.
#[test]
fn randomized_convergence_with_snapshot_recovery() {
    let bin = require_nats!();
    let forced = env_u64("HARMONYLITE_SHARDS");
    for seed in seeds_from_env(vec![5, 8]) {
        let shards = forced.unwrap_or(if seed % 2 == 0 { 1 } else { 3 });
        run_seed(&bin, seed, shards, Some(24));
    }
}
