//! End-to-end benchmark: starts a nats-server and two harmonylite nodes on this machine, then
//! measures
//!
//! 1. throughput: 20,000 rows inserted on node 1 in 1,000-row transactions, from the first commit
//!    until all are visible on node 2;
//! 2. latency: 1,000 single-row transactions at 200/s, each from its commit on node 1 until it is
//!    visible on node 2 (p50 / p99 / max);
//! 3. latency after idle: 20 single-row transactions, each after 1–5 s of quiet (what a user's
//!    first write after a pause sees; the target is a p99 no worse than under load).
//!
//! `-- snapshot [SIZE_MB]` instead measures snapshot save and restore of a SIZE_MB (default
//! 1024) database against `cp`, with the daemon's peak RSS (see `bench/snapshot.rs`).
//! `-- deferred RATES INTERVALS SECS [immediate]` instead measures how often deferred
//! read-then-write transactions fail on a node receiving changes, per `apply_interval_ms`
//! (see `bench/deferred.rs`).
//!
//! Run: `cargo run --release --example bench` (after `scripts/install-test-servers.sh`, or with
//! `nats-server` on `PATH`, or `HARMONYLITE_NATS_SERVER=/path/to/nats-server`).
//! `-- --charts docs` also writes `bench-throughput.png` and `bench-latency.png` there.
//! Streams keep 1,000,000 messages (`max_entries`): with Go's default of 1,024, a burst larger
//! than that outruns any consumer and the stream discards what lagging nodes have not read.
//! The nodes run in this process through the library (`harmonylite::app::run`), with the same code
//! path as the binary; each has its own database, connections and NATS client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rusqlite::Connection;
use tokio_util::sync::CancellationToken;

const THROUGHPUT_ROWS: i64 = 20_000;
const TX_ROWS: i64 = 1_000;
const LATENCY_ROWS: usize = 1_000;
const LATENCY_RATE_PER_SEC: u64 = 200;
const IDLE_ROUNDS: usize = 20;

const SCHEMA: &str =
    "CREATE TABLE bench (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, n INTEGER);
                      CREATE TABLE lat (id INTEGER PRIMARY KEY, sent_ns INTEGER NOT NULL);";

fn find_nats_server() -> Result<PathBuf> {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/nats-server");
    let from_env = std::env::var_os("HARMONYLITE_NATS_SERVER").map(PathBuf::from);
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|c| c.is_file())
    });
    from_env
        .into_iter()
        .chain([local])
        .chain(on_path)
        .find(|c| c.is_file())
        .context("nats-server not found: run scripts/install-test-servers.sh")
}

struct Nats {
    child: Child,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nats(bin: &Path, dir: &Path) -> Result<Nats> {
    let ports = dir.join("ports");
    std::fs::create_dir_all(&ports)?;
    let mut cmd = Command::new(bin);
    harmonylite::stream::embedded::die_with_parent(&mut cmd);
    let child = cmd
        .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
        .arg(dir.join("js"))
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn nats-server")?;
    let file = ports.join(format!("nats-server_{}.ports", child.id()));
    let mut nats = Nats {
        child,
        url: String::new(),
    };
    let start = Instant::now();
    while nats.url.is_empty() {
        let parsed = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        if let Some(v) = parsed {
            nats.url = v["nats"][0].as_str().unwrap_or_default().to_owned();
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("nats-server did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(nats)
}

fn node_settings(dir: &Path, id: u64, url: &str) -> Result<harmonylite::config::Settings> {
    let db = dir.join(format!("node{id}.db"));
    Connection::open(&db)?.execute_batch(SCHEMA)?;
    let toml = format!(
        "db_path = {db:?}\nseq_map_path = {:?}\nnode_id = {id}\nscan_max_changes = {}\n[replication_log]\nmax_entries = 1000000\n[nats]\nurls = [{url:?}]\n",
        dir.join(format!("seq{id}.cbor")),
        std::env::var("BENCH_SCAN_MAX_CHANGES").unwrap_or_else(|_| "512".into())
    );
    let parsed = harmonylite::config::parse(&toml, Path::new("bench.toml"))?;
    Ok(parsed
        .config
        .validate(&harmonylite::config::Overrides::default())?)
}

fn count(conn: &Connection, table: &str) -> Result<i64> {
    Ok(conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)
}

fn wait_for(conn: &Connection, table: &str, n: i64, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while count(conn, table)? < n {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {n} rows in {table}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

#[path = "bench/snapshot.rs"]
mod snapshot;

#[path = "bench/deferred.rs"]
mod deferred;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__node") => return snapshot::child(&args[1..]),
        Some("snapshot") => {
            let mb = args
                .get(1)
                .map_or(Ok(1024), |a| a.parse())
                .context("SIZE_MB")?;
            return snapshot::run(&find_nats_server()?, mb);
        }
        Some("deferred") => return deferred::run(&find_nats_server()?, &args[1..]),
        _ => {}
    }
    if std::env::var_os("RUST_LOG").is_some() {
        harmonylite::logging::init(harmonylite::config::LogFormat::Console, true, 0);
    }
    let dir = tempfile::tempdir()?;
    let nats = start_nats(&find_nats_server()?, dir.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    for id in 1..=2 {
        let settings = node_settings(dir.path(), id, &nats.url)?;
        let token = shutdown.clone();
        nodes.push(rt.spawn(async move { harmonylite::app::run(settings, token).await }));
    }
    let db1 = Connection::open(dir.path().join("node1.db"))?;
    let db2 = Connection::open(dir.path().join("node2.db"))?;
    db1.busy_timeout(Duration::from_secs(10))?;
    db2.busy_timeout(Duration::from_secs(10))?;

    // Warm up: one row end to end, so start-up is not measured.
    db1.execute("INSERT INTO lat (id, sent_ns) VALUES (0, 0)", [])?;
    wait_for(&db2, "lat", 1, Duration::from_secs(30))?;

    // 1. Throughput.
    let payload = "x".repeat(100);
    let start = Instant::now();
    let mut next_id = 1;
    for _ in 0..THROUGHPUT_ROWS / TX_ROWS {
        let tx = db1.unchecked_transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO bench (id, payload, n) VALUES (?1, ?2, ?3)")?;
            for _ in 0..TX_ROWS {
                stmt.execute(rusqlite::params![next_id, payload, next_id * 7])?;
                next_id += 1;
            }
        }
        tx.commit()?;
    }
    let committed = start.elapsed();
    // Published = in the stream (the change log is retired later, once per cleanup interval).
    let published = {
        let url = nats.url.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        rt.block_on(async {
            let js = async_nats::jetstream::new(async_nats::connect(url).await?);
            loop {
                let mut stream = js.get_stream("harmonylite-changes-c-1").await?;
                let stored = stream.info().await?.state.messages;
                // The warm-up row plus every benchmark row.
                if stored > THROUGHPUT_ROWS as u64 {
                    return Ok::<_, anyhow::Error>(start.elapsed());
                }
                if Instant::now() > deadline {
                    bail!("node 1 did not publish its changes in time");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })?
    };
    let mut visible: Vec<(f64, i64)> = vec![(0.0, 0)];
    loop {
        let n = count(&db2, "bench")?;
        visible.push((start.elapsed().as_secs_f64(), n));
        if n >= THROUGHPUT_ROWS {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("timed out waiting for {THROUGHPUT_ROWS} rows on node 2");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = start.elapsed();
    let rate = THROUGHPUT_ROWS as f64 / elapsed.as_secs_f64();

    // 2. Latency: a watcher thread polls node 2 and stamps each id when it first appears.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = Arc::clone(&done);
        let path = dir.path().join("node2.db");
        std::thread::spawn(move || -> Result<Vec<(i64, Instant)>> {
            let conn = Connection::open(path)?;
            let mut seen = Vec::with_capacity(LATENCY_ROWS);
            let mut last = 0i64;
            let mut stmt = conn.prepare("SELECT id FROM lat WHERE id > ?1 ORDER BY id")?;
            while !done.load(Ordering::Relaxed) || seen.len() < LATENCY_ROWS {
                let ids: Vec<i64> = stmt
                    .query_map([last], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let now = Instant::now();
                for id in ids {
                    last = last.max(id);
                    seen.push((id, now));
                }
                if seen.len() >= LATENCY_ROWS {
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok(seen)
        })
    };
    let interval = Duration::from_nanos(1_000_000_000 / LATENCY_RATE_PER_SEC);
    let mut committed_at = Vec::with_capacity(LATENCY_ROWS);
    let begin = Instant::now();
    for i in 0..LATENCY_ROWS {
        let due = begin + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        db1.execute(
            "INSERT INTO lat (id, sent_ns) VALUES (?1, 0)",
            [i as i64 + 1],
        )?;
        committed_at.push(Instant::now());
    }
    done.store(true, Ordering::Relaxed);
    let seen = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    let mut latencies: Vec<Duration> = seen
        .iter()
        .map(|(id, at)| at.saturating_duration_since(committed_at[(*id - 1) as usize]))
        .collect();
    latencies.sort();

    // 3. Latency after idle: quiet for 1-5 s, then one insert, polled for on node 2.
    let mut idle_latencies = Vec::with_capacity(IDLE_ROUNDS);
    let mut check = db2.prepare("SELECT count(*) FROM lat WHERE id = ?1")?;
    for round in 0..IDLE_ROUNDS {
        std::thread::sleep(Duration::from_millis(1000 + (round as u64 * 1700) % 4000));
        let id = 1_000_000 + round as i64;
        db1.execute("INSERT INTO lat (id, sent_ns) VALUES (?1, 0)", [id])?;
        let at = Instant::now();
        loop {
            if check.query_row([id], |r| r.get::<_, i64>(0))? == 1 {
                idle_latencies.push(at.elapsed());
                break;
            }
            if at.elapsed() > Duration::from_secs(30) {
                bail!("an insert after idle did not arrive within 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    drop(check);
    idle_latencies.sort();

    println!(
        "harmonylite benchmark (2 nodes + nats-server on this machine, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "throughput: {THROUGHPUT_ROWS} rows in {TX_ROWS}-row transactions: committed on node 1 in {:.2} s, published by {:.2} s, all visible on node 2 after {:.2} s = {:.0} rows/s",
        committed.as_secs_f64(),
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
        rate
    );
    println!(
        "latency: {LATENCY_ROWS} single-row transactions at {LATENCY_RATE_PER_SEC}/s, commit on node 1 to visible on node 2: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    println!(
        "latency after idle: {IDLE_ROUNDS} single-row transactions, each after 1-5 s of quiet: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&idle_latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&idle_latencies, 0.99).as_secs_f64() * 1e3,
        idle_latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );

    if let Some(dir) = chart_dir() {
        let font = load_font()?;
        draw_throughput(
            &dir.join("bench-throughput.png"),
            font,
            &visible,
            committed,
            published,
            rate,
        )?;
        draw_latency(&dir.join("bench-latency.png"), font, &latencies)?;
        println!("charts written to {}", dir.display());
    }

    shutdown.cancel();
    for n in nodes {
        rt.block_on(n)??;
    }
    drop(nats);
    Ok(())
}

/// `--charts DIR`: where to write PNG charts of the run.
fn chart_dir() -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--charts")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

/// Registers a TrueType font for chart text (plotters draws text with ab_glyph, no system
/// libraries); DejaVu Sans ships with Debian and Ubuntu (package fonts-dejavu-core).
fn load_font() -> Result<&'static str> {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    let path = std::env::var("BENCH_FONT")
        .ok()
        .or_else(|| {
            CANDIDATES
                .iter()
                .find(|p| Path::new(p).exists())
                .map(|p| (*p).to_owned())
        })
        .context("no TrueType font for charts: install fonts-dejavu-core or set BENCH_FONT")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))?;
    Ok("sans-serif")
}

fn draw_throughput(
    path: &Path,
    font: &str,
    visible: &[(f64, i64)],
    committed: Duration,
    published: Duration,
    rate: f64,
) -> Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let xmax = visible.last().map_or(1.0, |p| p.0) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{THROUGHPUT_ROWS} rows in {TX_ROWS}-row transactions: {rate:.0} rows/s end to end"
            ),
            (font, 22),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0i64..THROUGHPUT_ROWS + THROUGHPUT_ROWS / 20)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first commit on node 1")
        .y_desc("rows visible on node 2")
        .label_style((font, 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(
            visible.iter().copied(),
            BLUE.stroke_width(3),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("rows visible on node 2")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(3)));
    for (t, label, color) in [
        (committed, "all committed on node 1", RED),
        (published, "all published by node 1", GREEN),
    ] {
        let x = t.as_secs_f64();
        chart
            .draw_series(LineSeries::new(
                vec![(x, 0), (x, THROUGHPUT_ROWS)],
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((font, 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn draw_latency(path: &Path, font: &str, sorted: &[Duration]) -> Result<()> {
    use plotters::prelude::*;
    let ms: Vec<f64> = sorted.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let (p50, p99) = (percentile(sorted, 0.5), percentile(sorted, 0.99));
    let bucket_ms = 0.5;
    let xmax = ms.last().copied().unwrap_or(1.0).max(1.0) + bucket_ms;
    let buckets = (xmax / bucket_ms).ceil() as usize;
    let mut counts = vec![0u32; buckets + 1];
    for v in &ms {
        counts[((v / bucket_ms) as usize).min(buckets)] += 1;
    }
    let ymax = counts.iter().copied().max().unwrap_or(1) + 10;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "commit on node 1 → visible on node 2, {LATENCY_ROWS} rows at {LATENCY_RATE_PER_SEC}/s: p50 {:.1} ms, p99 {:.1} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            ),
            (font, 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0u32..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_desc("transactions")
        .label_style((font, 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| {
                    let x0 = i as f64 * bucket_ms;
                    Rectangle::new(
                        [(x0, 0), (x0 + bucket_ms * 0.9, *c)],
                        BLUE.mix(0.7).filled(),
                    )
                }),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
