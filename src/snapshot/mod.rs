//! Snapshots (upstream-behaviour §6, design §3.8, §3.11): a consistent copy of the database without
//! `__harmonylite__` artifacts, stored with the stream positions it contains, so a node lacking
//! changes the streams dropped restores it and replays only the tail. [`save`] copies, strips and
//! uploads; [`fetch_verified`] downloads and checks; the apply thread merges
//! ([`crate::db::restore`]); [`scheduler`] decides when, [`leader`] who.
//!
//! Invariants:
//! - Application writers are never blocked by a save: the copy is read from a WAL snapshot that
//!   began between two apply batches, so the rows and the recorded positions match exactly.
//! - A snapshot is never restored unverified (size, SHA-256, Go's FNV tag, `integrity_check`); a
//!   refused one is logged and counted, and the node keeps trying.
//! - Work files: a temp dir by the database (same file system, not a small `/tmp`), always removed.
//! - Positions travel with the data: the file records them ([`POSITIONS_TABLE`]) besides the
//!   store's metadata (which a store may lose), so our snapshot never passes for Go's (none:
//!   restored with a replay of everything retained, which cannot fill what the streams dropped).
//!   Go ignores `__harmonylite__%` tables; restores never merge them, live databases never read it.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::db;

pub mod leader;
pub mod nats;
pub mod s3;
pub mod scheduler;
pub mod sftp;
pub mod store;
pub mod webdav;

pub use store::{Meta, Store};

/// Transfers larger than this log their progress.
const PROGRESS_BYTES: u64 = 8 * 1024 * 1024;
/// Pages copied per backup step (4 MiB with 4 KiB pages).
const PAGES_PER_STEP: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot copy the database")]
    Copy(#[source] rusqlite::Error),
    #[error("snapshot work file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The downloaded snapshot is not what its metadata says, or not a sound database.
    #[error("snapshot refused: {0}")]
    Refused(String),
    #[error("no snapshot in the store")]
    Missing,
    #[error("system busy capturing snapshot")]
    Busy,
    #[error("{0}")]
    Unusable(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the apply side's positions are read, consistently with the database content.
#[derive(Clone)]
pub struct Source {
    pub db_path: PathBuf,
    /// Stream names, index shard − 1.
    pub streams: Vec<String>,
    /// Per stream: the last applied sequence (committed).
    pub positions: Arc<[AtomicU64]>,
    /// Held by the apply thread while it applies a batch and publishes its positions.
    pub gate: Arc<Mutex<()>>,
}

/// Removes work directories a killed process left next to the database (each can be as large as
/// the database). Only call it while holding the database lock: no one else uses them then.
pub fn sweep_work_dirs(db_path: &Path) {
    let parent = crate::config::data_root_dir(db_path);
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(".harmonylite-snapshot-")
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "Removed a snapshot work directory left by an earlier run")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "Cannot remove an old snapshot work directory")
                }
            }
        }
    }
}

/// A work directory next to the database.
pub fn work_dir(db_path: &Path) -> Result<tempfile::TempDir, Error> {
    let parent = crate::config::data_root_dir(db_path);
    tempfile::Builder::new()
        .prefix(".harmonylite-snapshot-")
        .tempdir_in(&parent)
        .map_err(io(&parent))
}

/// Free space a restore of a `size`-byte snapshot leaves the application: the download and the
/// merge's WAL (up to the snapshot's size each) must fit with [`RESTORE_RESERVE`] to spare.
const RESTORE_RESERVE: u64 = 64 << 20;

/// `Some(bytes needed)` when `db_path`'s file system lacks room to restore a `size`-byte snapshot:
/// a node retrying every few seconds would fill it each time. Unreadable counts as room.
pub fn lacks_room_to_restore(db_path: &Path, size: u64) -> Option<u64> {
    let dir = crate::config::data_root_dir(db_path);
    let stat = nix::sys::statvfs::statvfs(&dir).ok()?;
    let free = stat.blocks_available() * stat.fragment_size();
    let need = size.saturating_mul(2).saturating_add(RESTORE_RESERVE);
    (free < need).then_some(need)
}

/// The table in a snapshot file recording, per stream, the last sequence the file contains. Not
/// [`db::APPLIED_TABLE`]: Go keeps a restored file whole and never updates that one, so a node
/// later switched to harmonylite would go back to the snapshot's position.
pub const POSITIONS_TABLE: &str = "__harmonylite__snapshot_positions";

/// Records `positions` in the stripped copy `conn` ([`POSITIONS_TABLE`]).
fn record_positions(conn: &Connection, positions: &BTreeMap<String, u64>) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE {POSITIONS_TABLE} (stream TEXT, seq INTEGER)"
    ))?;
    let mut insert = conn.prepare(&format!("INSERT INTO {POSITIONS_TABLE} VALUES (?1, ?2)"))?;
    for (stream, seq) in positions {
        insert.execute(rusqlite::params![stream, *seq as i64])?;
    }
    Ok(())
}

/// The positions a snapshot file records; `None` for Go's (or an older one of ours).
fn recorded_positions(path: &Path) -> Result<Option<BTreeMap<String, u64>>, Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY);
    let positions = conn.map_err(db::Error::from).and_then(|c| {
        if !db::has_table(&c, POSITIONS_TABLE)? {
            return Ok(None);
        }
        let mut stmt = c.prepare(&format!("SELECT stream, seq FROM {POSITIONS_TABLE}"))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(Some(rows.collect::<Result<_, _>>()?))
    });
    positions.map_err(|e| Error::Refused(format!("cannot read its positions: {e}")))
}

/// Copies the database (blocking) into `dir` without our tables and triggers: path and metadata
/// (positions, schema, node, time); the upload adds size and checksums ([`Store::upload_filling`]).
pub fn copy_database(
    source: &Source,
    dir: &Path,
    node_id: u64,
    schema_hash: &str,
) -> Result<(PathBuf, Meta), Error> {
    let started = Instant::now();
    let path = dir.join(store::OBJECT);
    let conn = db::open(&source.db_path).map_err(|e| Error::Unusable(e.to_string()))?;
    // Begin between two apply batches: it sees what the positions say (plus local writes).
    let mut positions: Vec<u64> = {
        let _gate = source.gate.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN DEFERRED; SELECT count(*) FROM sqlite_schema;")
            .map_err(Error::Copy)?;
        source
            .positions
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    };
    let copied = backup_copy(&conn, &path).map_err(Error::Copy);
    let _ = conn.execute_batch("COMMIT");
    drop(conn);
    copied?;
    let copy_ms = started.elapsed().as_millis() as u64;
    // Strip our objects; held events are in the positions, not the rows: go back before the oldest.
    let snap = Connection::open(&path).map_err(Error::Copy)?;
    lower_for_held(&snap, &source.streams, &mut positions).map_err(Error::Copy)?;
    strip(&snap).map_err(Error::Copy)?;
    let positions: BTreeMap<_, _> = source.streams.iter().cloned().zip(positions).collect();
    record_positions(&snap, &positions).map_err(Error::Copy)?;
    drop(snap);
    let strip_ms = started.elapsed().as_millis() as u64 - copy_ms;
    let meta = Meta {
        positions: Some(positions),
        schema_hash: Some(schema_hash.to_owned()),
        node_id: Some(node_id),
        created_ms: Some(crate::clock::unix_ms()),
        ..Meta::default()
    };
    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, copy_ms, strip_ms,
        positions = ?meta.positions, "snapshot copy ready");
    Ok((path, meta))
}

/// Copies the database `conn` reads (in its open read transaction) to `path` (backup API).
fn backup_copy(conn: &Connection, path: &Path) -> Result<(), rusqlite::Error> {
    let mut dest = Connection::open(path)?;
    // A work file, uploaded and deleted: no journal, no fsync (the next start sweeps it away).
    dest.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    let backup = rusqlite::backup::Backup::new(conn, &mut dest)?;
    let mut logged = Instant::now();
    loop {
        match backup.step(PAGES_PER_STEP)? {
            rusqlite::backup::StepResult::Done => return Ok(()),
            rusqlite::backup::StepResult::More => {
                if logged.elapsed().as_secs() >= 5 {
                    let p = backup.progress();
                    tracing::info!(
                        copied_pages = p.pagecount - p.remaining,
                        total_pages = p.pagecount,
                        "Copying the database for a snapshot"
                    );
                    logged = Instant::now();
                }
            }
            // Cannot happen while we hold the read transaction; wait a moment if it does.
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

fn lower_for_held(
    conn: &Connection,
    streams: &[String],
    positions: &mut [u64],
) -> Result<(), rusqlite::Error> {
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [crate::db::HELD_TABLE],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT stream, min(seq) FROM {} GROUP BY stream",
        db::quote(crate::db::HELD_TABLE)
    ))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (stream, seq) = row?;
        if let Some(i) = streams.iter().position(|s| *s == stream) {
            positions[i] = positions[i].min((seq.max(1) - 1) as u64);
        }
    }
    Ok(())
}

/// Drops every `__harmonylite__` trigger and table (their pages stay free) and leaves
/// rollback-journal mode. No VACUUM (Go does one): it may renumber the rowids that tables without a
/// primary key replicate by, and a restore would then delete and re-insert every row. Our index
/// keeping rowids through VACUUM stays, so a Go node's VACUUM of the snapshot keeps them too.
fn strip(conn: &Connection) -> Result<(), rusqlite::Error> {
    let objects: Vec<(String, String)> = {
        let mut stmt = conn.prepare(
            "SELECT type, name FROM sqlite_schema WHERE name LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\' \
             AND type IN ('trigger', 'table') ORDER BY type = 'table'",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    // synchronous first, else leaving WAL syncs the whole fresh copy (0.5 s/GB) for nothing.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = DELETE; BEGIN;")?;
    for (kind, name) in &objects {
        // `kind` is 'trigger' or 'table' (the query above).
        let what = kind.to_ascii_uppercase();
        conn.execute_batch(&format!("DROP {what} IF EXISTS {}", db::quote(name)))?;
    }
    conn.execute_batch(
        "DELETE FROM sqlite_sequence WHERE name LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\'; COMMIT;",
    )
    .or_else(|_| conn.execute_batch("COMMIT"))?;
    Ok(())
}

/// Size, hex SHA-256 and Go's FNV-1 64 tag of a file, in one streaming pass.
pub fn digest(path: &Path) -> Result<(u64, String, String), Error> {
    digest_with(path, true)
}

/// [`digest`]; without `fnv` the tag is left empty (and its thread is not started).
fn digest_with(path: &Path, fnv: bool) -> Result<(u64, String, String), Error> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut digester = Digester::new(fnv);
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        digester.update(bytes::Bytes::from(buf));
    }
    let (size, sha, tag) = digester.finish();
    Ok((size, crate::hex(&sha), tag))
}

/// Size, hex SHA-256 and optionally Go's FNV-1 64 tag of bytes fed in order; FNV-1, a serial byte
/// loop slower than hardware SHA-256, runs on its own thread over the same buffers.
pub struct Digester {
    sha: Sha256,
    size: u64,
    fnv: Option<(
        std::sync::mpsc::SyncSender<bytes::Bytes>,
        std::thread::JoinHandle<u64>,
    )>,
}

impl Digester {
    pub fn new(fnv: bool) -> Digester {
        let fnv = fnv.then(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
            let thread = std::thread::spawn(move || {
                rx.iter().fold(crate::wire::FNV1_64_OFFSET, |h, buf| {
                    crate::wire::fnv1_64_update(h, &buf)
                })
            });
            (tx, thread)
        });
        Digester {
            sha: Sha256::new(),
            size: 0,
            fnv,
        }
    }

    /// Adds the next bytes (cheap: `Bytes` is shared, not copied).
    pub fn update(&mut self, buf: bytes::Bytes) {
        self.sha.update(&buf);
        self.size += buf.len() as u64;
        if let Some((tx, _)) = &self.fnv {
            // The thread only ends when the sender is dropped, so this cannot fail.
            let _ = tx.send(buf);
        }
    }

    /// `(size, SHA-256 bytes, hex FNV tag or "")`.
    pub fn finish(self) -> (u64, [u8; 32], String) {
        let tag = self.fnv.map(|(tx, thread)| {
            drop(tx);
            thread.join().unwrap_or(0)
        });
        (
            self.size,
            self.sha.finalize().into(),
            tag.map(|t| format!("{t:x}")).unwrap_or_default(),
        )
    }
}

/// Checks a download against its metadata and `integrity_check` ([`Error::Refused`]: what fails).
pub fn verify(path: &Path, meta: &Meta) -> Result<(), Error> {
    // Integrity check and checksums run side by side (each CPU-bound); FNV only without SHA-256.
    std::thread::scope(|scope| {
        let check = scope.spawn(|| integrity(path));
        let sums = check_sums(path, meta);
        let checked = check
            .join()
            .unwrap_or_else(|_| Err(Error::Refused("integrity_check panicked".into())));
        sums.and(checked)
    })
}

fn check_sums(path: &Path, meta: &Meta) -> Result<(), Error> {
    let (size, sha256, fnv) = digest_with(path, meta.sha256.is_none())?;
    let fnv_checked = meta.fnv_tag.as_ref().filter(|_| meta.sha256.is_none());
    let refused = if let Some(want) = meta.size.filter(|&w| w != size) {
        format!("size is {size} bytes, its metadata says {want}")
    } else if let Some(want) = meta.sha256.as_ref().filter(|&w| *w != sha256) {
        format!("SHA-256 is {sha256}, its metadata says {want}")
    } else if let Some(want) = fnv_checked.filter(|&w| *w != fnv) {
        format!("FNV tag is {fnv}, its header says {want}")
    } else {
        return Ok(());
    };
    Err(Error::Refused(refused))
}

/// `PRAGMA integrity_check` on a downloaded file.
fn integrity(path: &Path) -> Result<(), Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| Error::Refused(format!("not an SQLite database: {e}")))?;
    let verdict: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect());
    match verdict {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(()),
        Ok(lines) => Err(Error::Refused(format!(
            "integrity_check: {}",
            lines.into_iter().take(5).collect::<Vec<_>>().join("; ")
        ))),
        Err(e) => Err(Error::Refused(format!("integrity_check failed: {e}"))),
    }
}

/// Saves a snapshot: copy, upload, remove the work files.
pub async fn save(
    source: &Source,
    store: &dyn Store,
    node_id: u64,
    schema_hash: &str,
) -> Result<Meta, Error> {
    let started = Instant::now();
    let dir = work_dir(&source.db_path)?;
    let (src, hash) = (source.clone(), schema_hash.to_owned());
    let work = dir.path().to_path_buf();
    let (path, meta) =
        tokio::task::spawn_blocking(move || copy_database(&src, &work, node_id, &hash))
            .await
            .map_err(|e| Error::Unusable(format!("snapshot copy task failed: {e}")))??;
    let size = std::fs::metadata(&path).map_err(io(&path))?.len();
    if size > PROGRESS_BYTES {
        tracing::info!(size, store = store.kind(), "Uploading snapshot");
    }
    let meta = store.upload_filling(&path, meta).await?;
    drop(dir);
    tracing::info!(size = meta.size, positions = ?meta.positions, elapsed_ms = started.elapsed().as_millis() as u64,
        store = store.kind(), "Snapshot saved");
    Ok(meta)
}

/// Downloads and verifies the snapshot in a new work dir; `Ok(None)` when the store is empty.
pub async fn fetch_verified(
    store: &dyn Store,
    db_path: &Path,
) -> Result<Option<(tempfile::TempDir, PathBuf, Meta)>, Error> {
    let dir = work_dir(db_path)?;
    let path = dir.path().join(store::OBJECT);
    let started = Instant::now();
    let Some(meta) = store.download(&path).await? else {
        return Ok(None);
    };
    let download_ms = started.elapsed().as_millis() as u64;
    let (p, m) = (path.clone(), meta.clone());
    let recorded =
        tokio::task::spawn_blocking(move || verify(&p, &m).and_then(|()| recorded_positions(&p)))
            .await
            .map_err(|e| Error::Unusable(format!("snapshot check task failed: {e}")))??;
    // The file's own record wins over the store's metadata (module header).
    let meta = Meta {
        positions: recorded.or(meta.positions),
        ..meta
    };
    tracing::info!(size = meta.size, positions = ?meta.positions, elapsed_ms = started.elapsed().as_millis() as u64,
        download_ms, store = store.kind(), "Downloaded snapshot, verified");
    Ok(Some((dir, path, meta)))
}

/// Builds the configured store (no request yet); an unworkable config fails, naming the key.
pub fn open_store(
    settings: &crate::config::Settings,
    js: &async_nats::jetstream::Context,
) -> Result<Arc<dyn Store>, Error> {
    use crate::config::SnapshotStore;
    let store: Arc<dyn Store> = match &settings.snapshot.store {
        SnapshotStore::Nats { replicas, bucket } => {
            Arc::new(nats::NatsStore::new(js.clone(), bucket.clone(), *replicas))
        }
        SnapshotStore::S3(s3) => Arc::new(s3::S3Store::new(s3)?),
        SnapshotStore::WebDav { url } => {
            Arc::new(webdav::WebDavStore::new(url, settings.node_name())?)
        }
        SnapshotStore::Sftp(sftp) => {
            Arc::new(Arc::new(sftp::SftpStore::new(sftp, settings.node_name())?))
        }
    };
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_needs_room_for_the_download_and_the_merge() {
        let dir = tempfile::tempdir().expect("test setup");
        let db = dir.path().join("a.db");
        assert_eq!(
            lacks_room_to_restore(&db, 1 << 20),
            None,
            "a small snapshot fits"
        );
        let need = lacks_room_to_restore(&db, u64::MAX / 4).expect("no disk is that big");
        assert!(need > u64::MAX / 2, "{need}");
    }

    /// A copy keeps every rowid (tables without an INTEGER PRIMARY KEY replicate by rowid; a
    /// VACUUM would renumber them) and none of our tables; the positions are the source's.
    /// A source with one stream, `s-1`, at `position`.
    fn one_stream_source(path: &Path, position: u64) -> Source {
        Source {
            db_path: path.to_owned(),
            streams: vec!["s-1".into()],
            positions: Arc::new([AtomicU64::new(position)]),
            gate: Arc::new(Mutex::new(())),
        }
    }

    #[test]
    fn copy_keeps_rowids_and_drops_our_tables() {
        let (dir, path) = crate::db::testutil::temp_db(
            "CREATE TABLE norow (v TEXT);
             CREATE TABLE __harmonylite__big_change_log (id INTEGER PRIMARY KEY, pad BLOB);",
        );
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 2000)
             INSERT INTO norow (rowid, v) SELECT i * 3, 'v' || i FROM s;
             DELETE FROM norow WHERE rowid % 2 = 0;
             WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 500)
             INSERT INTO __harmonylite__big_change_log (pad) SELECT randomblob(4000) FROM s;",
        )
        .expect("fill");
        let rowids = |c: &Connection| -> Vec<(i64, String)> {
            c.prepare("SELECT rowid, v FROM norow ORDER BY rowid")
                .expect("query")
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("rows")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        let want = rowids(&conn);
        let source = one_stream_source(&path, 42);
        let work = tempfile::tempdir_in(dir.path()).expect("work");
        let (copy, meta) = copy_database(&source, work.path(), 1, "hash").expect("copy");
        let snap = Connection::open(&copy).expect("open copy");
        assert_eq!(rowids(&snap), want);
        let ours: i64 = snap
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '__harmonylite__%'",
                [],
                |r| r.get(0),
            )
            .expect("schema");
        assert_eq!(ours, 1, "only {POSITIONS_TABLE}");
        assert_eq!(meta.positions, Some([("s-1".to_owned(), 42)].into()));
        assert_eq!(recorded_positions(&copy).expect("read"), meta.positions);
        let (size, sha256, fnv) = digest(&copy).expect("digest");
        let meta = Meta {
            size: Some(size),
            sha256: Some(sha256),
            fnv_tag: Some(fnv),
            ..meta
        };
        verify(&copy, &meta).expect("verifies");
    }

    /// An older reader keeps the newest commit out of the database file: the copy comes from
    /// the backup API then, and has it.
    #[test]
    fn copy_has_the_wal_only_commits_an_old_reader_keeps_from_the_file() {
        let (dir, path) = crate::db::testutil::temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY);");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; INSERT INTO t VALUES (1)")
            .expect("insert");
        let old = Connection::open(&path).expect("open");
        old.execute_batch("BEGIN; SELECT count(*) FROM t;")
            .expect("read");
        conn.execute_batch("INSERT INTO t VALUES (2)")
            .expect("insert");
        let source = one_stream_source(&path, 1);
        let work = tempfile::tempdir_in(dir.path()).expect("work");
        let (copy, _) = copy_database(&source, work.path(), 1, "hash").expect("copy");
        old.execute_batch("COMMIT").expect("end read");
        let n: i64 = Connection::open(&copy)
            .expect("open copy")
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 2);
    }

    #[test]
    fn fnv_tag_matches_go() {
        let d = tempfile::tempdir().expect("dir");
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789abcdef0123456789abcdef").expect("write");
        let (size, _, fnv) = digest(&p).expect("digest");
        assert_eq!(size, 32);
        assert_eq!(fnv, format!("{:x}", 13327427942603214261u64));
    }
}
