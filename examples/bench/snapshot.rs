//! `bench -- snapshot [SIZE_MB]`: save and restore of a SIZE_MB (default 1024) database, next to
//! `cp` of the same file on the same disk, with the daemon's peak RSS during each.
//!
//! The daemon runs as a child process (this executable re-run with `__node`), so its peak RSS
//! (`VmHWM`) is its own. Save: `-save-snapshot` (copy, strip, checksum, upload to the NATS object
//! store). Restore: a brand-new node joins a cluster whose stream (max_entries 16) no longer holds
//! the history, and restores the snapshot (download, checksums and integrity check, then the
//! merge into its live file); timed from its start until it logs `Restore complete`, with the
//! download and the checks as the daemon logged them.
//!
//! Every measured step (`cp`, save, restore) starts with memory in the same state: on a VM whose
//! kernel hands freed pages back to the hypervisor (virtio free page reporting), writing into a
//! page cache page that was handed back costs about ten times writing into one freed a moment
//! ago (1 GB: 3.9 s against 0.35 s on the CI machine), so a step run right after a gigabyte was
//! freed (as `cp` was, after the WAL truncation) would be measured on different hardware, in
//! effect. Before each step the bench waits until the kernel has stopped reporting (nothing to
//! wait for without page reporting), and it also prints `cp` measured without that wait.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rusqlite::Connection;

const SCHEMA: &str = "CREATE TABLE big (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, n INTEGER);";

/// Runs a node in this process: `__node CONFIG run|save`.
pub fn child(args: &[String]) -> Result<()> {
    let (Some(config), Some(mode)) = (args.first(), args.get(1)) else {
        bail!("usage: __node CONFIG run|save");
    };
    let parsed = harmonylite::config::load(Some(Path::new(config)))?;
    let settings = parsed
        .config
        .validate(&harmonylite::config::Overrides::default())?;
    harmonylite::logging::init(settings.log_format, false, settings.node_id);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    rt.block_on(async {
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                token.cancel();
            }
        });
        if mode == "save" {
            harmonylite::app::save_snapshot(settings, shutdown)
                .await
                .map(|_| ())
        } else {
            harmonylite::app::run(settings, shutdown).await
        }
    })
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, config: &Path, mode: &str, name: &str) -> Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        harmonylite::stream::embedded::die_with_parent(&mut cmd);
        let child = cmd
            .args(["__node"])
            .arg(config)
            .arg(mode)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Daemon { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident set so far, bytes.
    fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// Polls until `done` (or the process exits); returns (elapsed, peak RSS seen, exited ok).
    fn watch(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Daemon) -> bool,
    ) -> Result<(Duration, u64)> {
        let started = Instant::now();
        let mut peak = 0;
        loop {
            if let Some(rss) = self.peak_rss() {
                peak = peak.max(rss);
            }
            if done(self) {
                return Ok((started.elapsed(), peak));
            }
            if let Some(status) = self.child.try_wait()? {
                if done(self) || status.success() {
                    return Ok((started.elapsed(), peak));
                }
                bail!("node exited with {status}:\n{}", self.log());
            }
            if started.elapsed() > timeout {
                bail!("timed out:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, id: u64, url: &str) -> Result<PathBuf> {
    let path = dir.join(format!("node{id}.toml"));
    std::fs::write(
        &path,
        format!(
            "db_path = {:?}\nseq_map_path = {:?}\nnode_id = {id}\n[replication_log]\nmax_entries = 16\n\
             [nats]\nurls = [{url:?}]\n[snapshot]\nstore = \"nats\"\n",
            dir.join(format!("node{id}.db")),
            dir.join(format!("seq{id}.cbor")),
        ),
    )?;
    Ok(path)
}

/// Waits until the kernel's free page reporting (see the module header) has stopped handing
/// freed memory back: its counter unchanged for [`SETTLED_FOR`], at most a minute. Returns at
/// once where the kernel does no page reporting.
fn settle() {
    const COUNTER: &str = "/sys/module/page_reporting/parameters/reported_kib";
    const SETTLED_FOR: Duration = Duration::from_secs(4);
    let read = || {
        std::fs::read_to_string(COUNTER)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let Some(mut last) = read() else {
        return;
    };
    let (started, mut unchanged) = (Instant::now(), Instant::now());
    while started.elapsed() < Duration::from_secs(60) && unchanged.elapsed() < SETTLED_FOR {
        std::thread::sleep(Duration::from_millis(250));
        let now = read().unwrap_or(last);
        if now != last {
            (last, unchanged) = (now, Instant::now());
        }
    }
}

/// `cp` of `from` next to it, synced like our writes, timed; the copy is removed.
fn cp(from: &Path) -> Result<Duration> {
    let copy = from.with_extension("cp");
    let started = Instant::now();
    let status = Command::new("cp").arg(from).arg(&copy).status()?;
    let synced = Command::new("sync").arg(&copy).status()?;
    let took = started.elapsed();
    if !status.success() || !synced.success() {
        bail!("cp failed");
    }
    std::fs::remove_file(&copy)?;
    Ok(took)
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64().max(1e-9)
}

pub fn run(nats_bin: &Path, size_mb: u64) -> Result<()> {
    // Next to the target directory: the same disk as a real database, not a tmpfs.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = tempfile::Builder::new()
        .prefix("bench-snapshot-")
        .disable_cleanup(std::env::var_os("BENCH_KEEP").is_some())
        .tempdir_in(&base)?;
    let nats = super::start_nats(nats_bin, dir.path())?;
    let db1 = dir.path().join("node1.db");
    {
        let conn = Connection::open(&db1)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch("PRAGMA journal_mode = WAL")?;
        let rows = size_mb * 256; // 4 KiB payloads
        let started = Instant::now();
        conn.execute_batch(&format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows})
             INSERT INTO big (id, payload, n) SELECT i, randomblob(4000), i FROM s;
             PRAGMA wal_checkpoint(TRUNCATE);"
        ))?;
        eprintln!(
            "created a {size_mb} MB database in {:.1?}",
            started.elapsed()
        );
    }
    Connection::open(dir.path().join("node2.db"))?.execute_batch(SCHEMA)?;
    let size = std::fs::metadata(&db1)?.len();

    // cp of the same file, same disk: right after the WAL truncation freed a gigabyte, and then
    // in the state every measured step starts in.
    let cp_unsettled = cp(&db1)?;
    settle();
    let cp = cp(&db1)?;

    // Node 1 runs, and 100 writes through it truncate the 16-message stream.
    let c1 = config(dir.path(), 1, &nats.url)?;
    {
        let mut n1 = Daemon::start(dir.path(), &c1, "run", "node1-run")?;
        n1.watch(Duration::from_secs(60), |d| {
            d.log().contains("Replication running")
        })?;
        let conn = Connection::open(&db1)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        for i in 0..100 {
            conn.execute("UPDATE big SET n = n + 1 WHERE id = ?1", [i + 1])?;
        }
        let seq = dir.path().join("seq1.cbor");
        let start = Instant::now();
        while std::fs::metadata(&seq).map_or(0, |m| m.len()) == 0
            || !n1.log().contains("Snapshot saved")
        {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("node 1 did not apply its writes:\n{}", n1.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(n1.child.id().to_string())
            .status();
        n1.watch(Duration::from_secs(60), |_| false).ok();
    }

    // Save, as -save-snapshot does.
    settle();
    let mut saver = Daemon::start(dir.path(), &c1, "save", "node1-save")?;
    let (save, save_rss) = saver.watch(Duration::from_secs(1800), |_| false)?;
    if !saver.log().contains("Snapshot saved") {
        bail!("save failed:\n{}", saver.log());
    }

    // Restore: a new node joins.
    let c2 = config(dir.path(), 2, &nats.url)?;
    settle();
    let mut n2 = Daemon::start(dir.path(), &c2, "run", "node2")?;
    let (restore, restore_rss) = n2.watch(Duration::from_secs(1800), |d| {
        d.log().contains("Restore complete")
    })?;
    let rows: i64 = Connection::open(dir.path().join("node2.db"))?.query_row(
        "SELECT count(*) FROM big",
        [],
        |r| r.get(0),
    )?;
    if rows as u64 != size_mb * 256 {
        bail!("restored {rows} rows, expected {}", size_mb * 256);
    }
    let mb = size as f64 / 1_048_576.0;
    println!("snapshot of a {mb:.0} MB database (same disk):");
    println!(
        "  cp + sync        {:>8.0} MB/s  ({cp:.2?})",
        mb_s(size, cp)
    );
    println!(
        "  (cp + sync right after a GB was freed: {:.0} MB/s, {cp_unsettled:.2?})",
        mb_s(size, cp_unsettled)
    );
    println!(
        "  save             {:>8.0} MB/s  ({save:.2?}, {:.1}x cp)  peak RSS {} MB",
        mb_s(size, save),
        save.as_secs_f64() / cp.as_secs_f64(),
        save_rss / 1_048_576
    );
    println!(
        "  restore          {:>8.0} MB/s  ({restore:.2?}, {:.1}x cp)  peak RSS {} MB",
        mb_s(size, restore),
        restore.as_secs_f64() / cp.as_secs_f64(),
        restore_rss / 1_048_576
    );
    let log = n2.log();
    if let (Some(fetched), Some(download)) = (
        logged_ms(&log, "Downloaded snapshot", "elapsed_ms="),
        logged_ms(&log, "Downloaded snapshot", "download_ms="),
    ) {
        println!(
            "    of which download {:.2}s, checks {:.2}s, the rest (start, merge, commit) {:.2}s",
            download / 1e3,
            (fetched - download) / 1e3,
            restore.as_secs_f64() - fetched / 1e3
        );
    }
    println!("  (targets: within 3x cp; peak RSS < 100 MB)");
    Ok(())
}

/// The number after `key` on the first log line containing `line`.
fn logged_ms(log: &str, line: &str, key: &str) -> Option<f64> {
    let at = log.lines().find(|l| l.contains(line))?;
    let rest = &at[at.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
