//! `bench -- deferred RATES INTERVALS SECS [immediate]`: how often an application's deferred
//! read-then-write transaction fails with `database is locked` on a node that receives other
//! nodes' changes, for each `replication_log.apply_interval_ms`.
//!
//! Why it fails: in WAL mode a deferred transaction (`BEGIN; SELECT …; UPDATE …; COMMIT`) reads
//! from a snapshot; if another connection commits between its first read and its first write,
//! the write cannot be upgraded and fails at once with SQLITE_BUSY (the busy handler cannot help,
//! the snapshot is stale). The apply thread's commits are such commits, so the failure rate
//! follows P ≈ 1 − exp(−apply commits per second × read-to-write gap).
//!
//! Per point (a rate, an interval): a fresh nats-server and two nodes (node 2 with that
//! `apply_interval_ms`). Node 1's application inserts RATE single-row transactions per second
//! into `t` (each stamped with its wall-clock time); node 2's application loops
//! `BEGIN; SELECT v FROM t WHERE id = ?; (2 ms of "app logic"); UPDATE t2 …; COMMIT`, 3 ms
//! apart (t2 is written only there) for SECS seconds and counts the transactions that fail. A watcher on
//! node 2 records when each of node 1's rows becomes visible (replication latency), and node 2's
//! `harmonylite_apply_commits` gives its apply commits per second. `immediate` runs the
//! transactions with `BEGIN IMMEDIATE` instead (they wait for the lock instead of failing).
//!
//! Example: `cargo run --release --example bench -- deferred 200,5 0,5,10,20,50,100 20`.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, ErrorCode};
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL, sent_ns INTEGER);
                      CREATE TABLE t2 (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);";
/// Rows of `t` read by the transactions (seeded before measuring).
const SEED_ROWS: i64 = 1000;
/// Rows of `t2` the transactions update.
const T2_ROWS: i64 = 100;
/// The application's work between its read and its write.
const APP_LOGIC: Duration = Duration::from_millis(2);
/// The application's pause between two transactions (back to back, `BEGIN IMMEDIATE`
/// transactions that sleep inside the lock starve the apply thread: it never gets the lock).
const BETWEEN: Duration = Duration::from_millis(3);

/// One measured point.
struct Point {
    rate: u64,
    interval_ms: u64,
    immediate: bool,
    transactions: u64,
    failed: u64,
    commits_per_sec: f64,
    latencies: Vec<Duration>,
}

pub fn run(nats_bin: &Path, args: &[String]) -> Result<()> {
    let list = |i: usize, what: &str| -> Result<Vec<u64>> {
        let text = args.get(i).with_context(|| format!("missing {what}"))?;
        text.split(',')
            .map(|v| v.parse().with_context(|| format!("{what}: {v:?}")))
            .collect()
    };
    let rates = list(0, "RATES (rows/s, comma-separated)")?;
    let intervals = list(1, "INTERVALS (ms, comma-separated)")?;
    let secs = list(2, "SECS")?.first().copied().unwrap_or(20);
    let immediate = args.get(3).is_some_and(|a| a == "immediate");
    println!(
        "deferred read-then-write transactions on node 2 ({} ms app logic between read and write), {secs} s per point",
        APP_LOGIC.as_millis()
    );
    println!(
        "rate rows/s | apply_interval_ms | BEGIN | transactions | failed | failed % | node-2 apply commits/s | latency p50 ms | p99 ms"
    );
    for &rate in &rates {
        for &interval_ms in &intervals {
            let p = point(nats_bin, rate, interval_ms, immediate, secs)?;
            let mut l = p.latencies.clone();
            l.sort();
            let ms = |q: f64| {
                if l.is_empty() {
                    f64::NAN
                } else {
                    super::percentile(&l, q).as_secs_f64() * 1e3
                }
            };
            println!(
                "{} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} | {:.1}",
                p.rate,
                p.interval_ms,
                if p.immediate { "IMMEDIATE" } else { "deferred" },
                p.transactions,
                p.failed,
                100.0 * p.failed as f64 / p.transactions.max(1) as f64,
                p.commits_per_sec,
                ms(0.5),
                ms(0.99)
            );
        }
    }
    Ok(())
}

fn settings(dir: &Path, id: u64, url: &str, extra: &str) -> Result<harmonylite::config::Settings> {
    let db = dir.join(format!("node{id}.db"));
    Connection::open(&db)?.execute_batch(SCHEMA)?;
    let toml = format!(
        "db_path = {db:?}\nseq_map_path = {:?}\nnode_id = {id}\n[replication_log]\nmax_entries = 1000000\n{extra}\n[nats]\nurls = [{url:?}]\n",
        dir.join(format!("seq{id}.cbor")),
    );
    let parsed = harmonylite::config::parse(&toml, Path::new("bench.toml"))?;
    Ok(parsed
        .config
        .validate(&harmonylite::config::Overrides::default())?)
}

fn point(
    nats_bin: &Path,
    rate: u64,
    interval_ms: u64,
    immediate: bool,
    secs: u64,
) -> Result<Point> {
    let dir = tempfile::tempdir()?;
    let nats = super::start_nats(nats_bin, dir.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut nodes = Vec::new();
    for (id, extra) in [
        (1, String::new()),
        (
            2,
            format!(
                "apply_interval_ms = {interval_ms}\n[prometheus]\nenable = true\nbind = \"127.0.0.1:{port}\""
            ),
        ),
    ] {
        let s = settings(dir.path(), id, &nats.url, &extra)?;
        let token = shutdown.clone();
        nodes.push(rt.spawn(async move { harmonylite::app::run(s, token).await }));
    }
    let db1 = Connection::open(dir.path().join("node1.db"))?;
    let db2 = Connection::open(dir.path().join("node2.db"))?;
    db1.busy_timeout(Duration::from_secs(5))?;
    db2.busy_timeout(Duration::from_secs(5))?;
    seed(&db1, &db2)?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(dir.path().join("node1.db"), rate, Arc::clone(&stop));
    let watcher = spawn_watcher(dir.path().join("node2.db"), Arc::clone(&stop));
    let commits_before = apply_commits(port)?;
    let start = Instant::now();
    let (transactions, failed) = transactions(&db2, immediate, Duration::from_secs(secs))?;
    let commits_per_sec = (apply_commits(port)? - commits_before) / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let latencies = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    shutdown.cancel();
    for n in nodes {
        rt.block_on(n)??;
    }
    drop(nats);
    Ok(Point {
        rate,
        interval_ms,
        immediate,
        transactions,
        failed,
        commits_per_sec,
        latencies,
    })
}

/// Rows both transactions need, written on node 1 and waited for on node 2 (start-up excluded).
fn seed(db1: &Connection, db2: &Connection) -> Result<()> {
    // Rows written before a node installed its capture triggers are never sent.
    let start = Instant::now();
    let triggers = "SELECT count(DISTINCT tbl_name) FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN ('t', 't2')";
    for db in [db1, db2] {
        while db.query_row(triggers, [], |r| r.get::<_, i64>(0))? < 2 {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the nodes did not install capture");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let tx = db1.unchecked_transaction()?;
    for id in 1..=SEED_ROWS {
        tx.execute("INSERT INTO t (id, v) VALUES (?1, ?1)", [id])?;
    }
    for id in 1..=T2_ROWS {
        tx.execute("INSERT INTO t2 (id, n) VALUES (?1, 0)", [id])?;
    }
    tx.commit()?;
    let start = Instant::now();
    while db2.query_row("SELECT count(*) FROM t2", [], |r| r.get::<_, i64>(0))? < T2_ROWS
        || db2.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))? < SEED_ROWS
    {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("seed rows did not reach node 2");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Node 1's application: `rate` single-row inserts per second, each stamped with its time.
fn spawn_writer(
    db: std::path::PathBuf,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let conn = Connection::open(db)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let every = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let begin = Instant::now();
        let mut i: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(wait) = (begin + every * i).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            conn.execute(
                "INSERT INTO t (id, v, sent_ns) VALUES (?1, ?1, ?2)",
                [SEED_ROWS + 1 + i64::from(i), now_ns()],
            )?;
            i += 1;
        }
        Ok(())
    })
}

/// Polls node 2 for node 1's new rows; their replication latency from the stamp.
fn spawn_watcher(
    db: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Vec<Duration>>> {
    std::thread::spawn(move || {
        let conn = Connection::open(db)?;
        let mut stmt = conn.prepare("SELECT id, sent_ns FROM t WHERE id > ?1 ORDER BY id")?;
        let (mut last, mut seen) = (SEED_ROWS, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let rows: Vec<(i64, i64)> = stmt
                .query_map([last], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let now = now_ns();
            for (id, sent) in rows {
                last = last.max(id);
                seen.push(Duration::from_nanos((now - sent).max(0) as u64));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(seen)
    })
}

/// Node 2's application for `length`: (transactions, failed).
fn transactions(db: &Connection, immediate: bool, length: Duration) -> Result<(u64, u64)> {
    let begin = if immediate {
        "BEGIN IMMEDIATE"
    } else {
        "BEGIN"
    };
    let (mut n, mut failed) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < length {
        let read = 1 + (n as i64 * 7919) % SEED_ROWS;
        let target = 1 + n as i64 % T2_ROWS;
        let result = read_then_write(db, begin, read, target);
        n += 1;
        std::thread::sleep(BETWEEN);
        match result {
            Ok(()) => {}
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::DatabaseBusy => {
                failed += 1;
                let _ = db.execute_batch("ROLLBACK");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((n, failed))
}

/// One transaction: read a row of `t`, think, update a row of `t2`.
fn read_then_write(db: &Connection, begin: &str, read: i64, target: i64) -> rusqlite::Result<()> {
    db.execute_batch(begin)?;
    let v: i64 = db.query_row("SELECT v FROM t WHERE id = ?1", [read], |r| r.get(0))?;
    std::thread::sleep(APP_LOGIC);
    db.execute(
        "UPDATE t2 SET n = n + ?1 WHERE id = ?2",
        [v % 3 + 1, target],
    )?;
    db.execute_batch("COMMIT")
}

/// `harmonylite_apply_commits` of the node serving metrics on `port`.
fn apply_commits(port: u16) -> Result<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find(|l| l.starts_with("harmonylite_apply_commits{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .context("harmonylite_apply_commits not in the metrics")
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
