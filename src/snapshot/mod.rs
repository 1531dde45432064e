//! Snapshots (upstream-behaviour §6, design §3.8 and §3.11): a consistent copy of the database
//! without any `__harmonylite__` artifact, stored with the stream positions it contains, so that
//! a node that lacks changes the streams no longer hold (a new node, a long-stopped one, one that
//! fell behind) restores it and replays only the tail.
//!
//! - [`save`]: copy (from a read transaction that began between two apply batches, so the rows
//!   and the recorded positions match exactly: the file's bytes when the file alone holds what
//!   it sees, see `filecopy`, else SQLite's backup API), strip, checksum, upload.
//! - [`fetch`]: download; [`Verification`]: check size, SHA-256, Go's FNV tag and
//!   `PRAGMA integrity_check`, beside the merge, before anything of it commits.
//! - The restore itself is [`crate::db::restore`], run by the apply thread.
//! - [`leader`]: Go's snapshot-leader election and save lease; [`scheduler`]: when to save.
//!
//! Invariants:
//! - Application writers are never blocked by a save: the copy is read from a WAL snapshot.
//! - A snapshot is never restored unverified (its merge commits only once the checks passed); a
//!   refused one is logged and counted, and the node keeps trying.
//! - Work files live next to the database (same file system, not a small `/tmp`) in a temp dir
//!   removed on every path.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::db;

mod filecopy;
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

/// Why a snapshot could not be saved or used.
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

/// Copies the database into `dir` as a plain SQLite file without our tables and triggers, and
/// returns its path and metadata: positions, schema, node and time; the size and checksums are
/// left to the upload, which computes them from the bytes it sends (see
/// [`Store::upload_filling`]). Blocking.
///
/// # Errors
/// SQLite or file errors.
pub fn copy_database(
    source: &Source,
    dir: &Path,
    node_id: u64,
    schema_hash: &str,
) -> Result<(PathBuf, Meta), Error> {
    let started = Instant::now();
    let path = dir.join(store::OBJECT);
    let conn = db::open(&source.db_path).map_err(|e| Error::Unusable(e.to_string()))?;
    // Begin the read transaction between two apply batches: what it sees is exactly what the
    // positions say (plus local writes, which replicate on their own).
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
    let mut by_file = filecopy::file_holds_read_snapshot(&source.db_path);
    if by_file && let Err(e) = filecopy::copy_db_file(&source.db_path, &path) {
        // Still inside the read transaction: the backup API copies the same snapshot.
        tracing::warn!(error = %e, "Cannot copy the database file for a snapshot; using SQLite's backup API");
        let _ = std::fs::remove_file(&path);
        by_file = false;
    }
    let copied = if by_file {
        Ok(())
    } else {
        backup_copy(&conn, &path).map_err(Error::Copy)
    };
    let _ = conn.execute_batch("COMMIT");
    drop(conn);
    copied?;
    let copy_ms = started.elapsed().as_millis() as u64;
    // Strip our artifacts; events held for a UNIQUE conflict are part of the positions but not of
    // the rows, so the positions go back to just before the oldest of them.
    {
        let snap = Connection::open(&path).map_err(Error::Copy)?;
        lower_for_held(&snap, &source.streams, &mut positions).map_err(Error::Copy)?;
        strip(&snap).map_err(Error::Copy)?;
    }
    let strip_ms = started.elapsed().as_millis() as u64 - copy_ms;
    let meta = Meta {
        positions: Some(
            source
                .streams
                .iter()
                .cloned()
                .zip(positions.iter().copied())
                .collect::<BTreeMap<_, _>>(),
        ),
        schema_hash: Some(schema_hash.to_owned()),
        node_id: Some(node_id),
        created_ms: Some(now_ms()),
        ..Meta::default()
    };
    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, copy_ms, strip_ms, by_file,
        positions = ?meta.positions, "snapshot copy ready");
    Ok((path, meta))
}

/// Copies the database `conn` reads (in its open read transaction) into a new file at `path`
/// with SQLite's backup API.
fn backup_copy(conn: &Connection, path: &Path) -> Result<(), rusqlite::Error> {
    let mut dest = Connection::open(path)?;
    // A work file, uploaded and deleted: no journal and no fsync (a crash leaves a file the
    // next start sweeps away).
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

/// Drops every `__harmonylite__` trigger and table and leaves rollback-journal mode.
///
/// No VACUUM (Go does one): it may renumber the rowids of tables without an INTEGER PRIMARY KEY,
/// and those rowids are the keys such tables replicate by — a restore would then delete and
/// re-insert every row under another rowid. The pages our tables used stay free in the file.
fn strip(conn: &Connection) -> Result<(), rusqlite::Error> {
    let objects: Vec<(String, String)> = {
        let mut stmt = conn.prepare(
            "SELECT type, name FROM sqlite_schema WHERE name LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\' \
             AND type IN ('trigger', 'table') ORDER BY type = 'table'",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    // synchronous first: leaving WAL mode syncs the file otherwise, which forces the whole
    // fresh copy to disk (half a second per GB) for a file that is uploaded and deleted.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = DELETE; BEGIN;")?;
    for (kind, name) in &objects {
        let what = if kind == "trigger" {
            "TRIGGER"
        } else {
            "TABLE"
        };
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
    digest_with(path, true, None)
}

/// [`digest`]; without `fnv` the tag is left empty (and its thread is not started). With an
/// `arrival`, reads the file as it downloads, each piece once it is there.
fn digest_with(
    path: &Path,
    fnv: bool,
    arrival: Option<&db::arriving::Arrival>,
) -> Result<(u64, String, String), Error> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut digester = Digester::new(fnv);
    let mut offset = 0u64;
    loop {
        const PIECE: usize = 1 << 20;
        if let Some(a) = arrival {
            a.wait_for_bytes(offset + PIECE as u64)
                .map_err(|why| Error::Unusable(format!("the download did not complete: {why}")))?;
        }
        let mut buf = vec![0u8; PIECE];
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        offset += n as u64;
        digester.update(bytes::Bytes::from(buf));
    }
    Ok(digester.finish())
}

/// Size, hex SHA-256 and (optionally) Go's FNV-1 64 tag of bytes fed in order, for a file read
/// once for another purpose too (an upload). FNV-1 is a serial byte loop slower than SHA-256
/// (with the CPU's SHA instructions), so it runs on a thread of its own over the same buffers;
/// at most a few buffers wait for it.
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

    /// `(size, hex SHA-256, hex FNV tag or "")`.
    pub fn finish(self) -> (u64, String, String) {
        let (size, sha, tag) = self.finish_raw();
        (size, crate::hex(&sha), tag)
    }

    /// `(size, SHA-256 bytes, hex FNV tag or "")`.
    pub fn finish_raw(self) -> (u64, [u8; 32], String) {
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

/// Checks a downloaded file against its metadata and SQLite's own integrity check. With an
/// `arrival` (the download still writing it), both read the file as it arrives, and the verdict
/// waits for the download's end: a download that failed is [`Error::Unusable`] (tried again),
/// never a refusal of the object.
///
/// # Errors
/// [`Error::Refused`] naming what does not match.
pub fn verify(
    path: &Path,
    meta: &Meta,
    arrival: Option<&Arc<db::arriving::Arrival>>,
) -> Result<(), Error> {
    // SQLite's check and the checksums run side by side (each is CPU-bound); Go's FNV tag is
    // only computed when there is no SHA-256 to check.
    let checked = std::thread::scope(|scope| {
        let check = scope.spawn(|| integrity(path, arrival));
        let sums = check_sums(path, meta, arrival.map(|a| &**a));
        let checked = check
            .join()
            .unwrap_or_else(|_| Err(Error::Refused("integrity_check panicked".into())));
        sums.and(checked)
    });
    if let Some(a) = arrival {
        a.wait_end()
            .map_err(|why| Error::Unusable(format!("the download did not complete: {why}")))?;
    }
    checked
}

fn check_sums(
    path: &Path,
    meta: &Meta,
    arrival: Option<&db::arriving::Arrival>,
) -> Result<(), Error> {
    let (size, sha256, fnv) = digest_with(path, meta.sha256.is_none(), arrival)?;
    if let Some(want) = meta.size
        && want != size
    {
        return Err(Error::Refused(format!(
            "size is {size} bytes, its metadata says {want}"
        )));
    }
    if let Some(want) = &meta.sha256
        && *want != sha256
    {
        return Err(Error::Refused(format!(
            "SHA-256 is {sha256}, its metadata says {want}"
        )));
    }
    if meta.sha256.is_none()
        && let Some(want) = &meta.fnv_tag
        && *want != fnv
    {
        return Err(Error::Refused(format!(
            "FNV tag is {fnv}, its header says {want}"
        )));
    }
    Ok(())
}

/// `PRAGMA integrity_check` on a downloaded file (read as it arrives, with an `arrival`).
fn integrity(path: &Path, arrival: Option<&Arc<db::arriving::Arrival>>) -> Result<(), Error> {
    let file = db::arriving::SnapshotFile {
        path: path.to_path_buf(),
        arrival: arrival.cloned(),
    };
    let (uri, _registered) = file.uri().map_err(Error::Unusable)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(&uri, flags)
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
///
/// # Errors
/// Copy, file or store errors.
pub async fn save(
    source: &Source,
    store: &dyn Store,
    node_id: u64,
    schema_hash: &str,
) -> Result<Meta, Error> {
    let started = Instant::now();
    let dir = work_dir(&source.db_path)?;
    let (src, hash, work) = (
        source.clone(),
        schema_hash.to_owned(),
        dir.path().to_path_buf(),
    );
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

/// Merge speed assumed when deciding when to start merging a snapshot that is still arriving
/// ([`Fetching::ready_to_merge`]): about what we measured (120–150 MB/s on a 2-core VM, beside
/// the download). A faster merge waits for bytes while it holds the write lock, at most until
/// the download would have ended anyway; a slower one never does.
const MERGE_BYTES_PER_SEC: f64 = 128.0 * 1024.0 * 1024.0;

/// A snapshot download running in the background (see [`fetch`]). Dropped, it stops the
/// download, and the file's readers fail instead of waiting.
pub struct Fetching {
    /// The work dir holding the file (removed when dropped).
    _dir: tempfile::TempDir,
    pub file: PathBuf,
    /// The metadata the store announced before the data.
    pub meta: Meta,
    pub arriving: store::Arriving,
    began: Instant,
    /// The download task (a set, so that dropping it aborts the task).
    task: tokio::task::JoinSet<Result<Option<Meta>, Error>>,
    /// Its outcome, when it ended before it was asked for.
    ended: Option<Result<Option<Meta>, Error>>,
}

/// Starts downloading the snapshot into a new work dir and returns once the store has announced
/// its metadata (before the data): the file may be read while it arrives, through
/// [`Fetching::arriving`]. `Ok(None)` when the store is empty. Nothing is checked yet: that is
/// [`Verification`]'s job, before anything of the file commits.
///
/// # Errors
/// Store errors before the data began.
pub async fn fetch(store: &Arc<dyn Store>, db_path: &Path) -> Result<Option<Fetching>, Error> {
    let dir = work_dir(db_path)?;
    let file = dir.path().join(store::OBJECT);
    let arriving = store::Arriving::new();
    let mut begun = arriving.begun();
    let mut task = tokio::task::JoinSet::new();
    let (st, path, a) = (Arc::clone(store), file.clone(), arriving.clone());
    task.spawn(async move {
        let started = Instant::now();
        let got = st.download_arriving(&path, &a).await;
        a.end(match &got {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("the snapshot disappeared from the store".into()),
            Err(e) => Err(crate::error_chain(e)),
        });
        if let Ok(Some(meta)) = &got {
            tracing::info!(size = meta.size, positions = ?meta.positions, elapsed_ms = started.elapsed().as_millis() as u64,
                store = st.kind(), "Downloaded snapshot");
        }
        got.map_err(Error::from)
    });
    let (mut meta, mut ended) = tokio::select! {
        seen = begun.wait_for(Option::is_some) => match seen.ok().and_then(|m| m.clone()) {
            Some(meta) => (meta, None),
            None => return Err(Error::Unusable("the download ended without a beginning".into())),
        },
        done = task.join_next() => {
            let got = joined(done);
            match got {
                Ok(None) => return Ok(None),
                Err(e) => return Err(e),
                Ok(Some(meta)) => (meta.clone(), Some(Ok(Some(meta)))),
            }
        }
    };
    // Without a size the file cannot be read before it is complete (SQLite needs it), and a
    // store that trusts its sidecar only once the size matches says more at the end.
    if ended.is_none() && arriving.arrival().progress().1.is_none() {
        match joined(task.join_next().await)? {
            None => return Ok(None),
            Some(end) => {
                meta = end.clone();
                ended = Some(Ok(Some(end)));
            }
        }
    }
    Ok(Some(Fetching {
        _dir: dir,
        file,
        meta,
        arriving,
        began: Instant::now(),
        task,
        ended,
    }))
}

fn joined(
    done: Option<Result<Result<Option<Meta>, Error>, tokio::task::JoinError>>,
) -> Result<Option<Meta>, Error> {
    match done {
        Some(Ok(got)) => got,
        Some(Err(e)) => Err(Error::Unusable(format!("the download task failed: {e}"))),
        None => Err(Error::Unusable("the download task is gone".into())),
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        // Stops a download still running (a blocking one stops at its next piece).
        self.arriving
            .end(Err("the download is not wanted any more".into()));
    }
}

impl Fetching {
    /// Waits until merging may start: when the rest of the download should take no longer than
    /// the merge (at the rate seen so far), or it has ended. Merging sooner would hold the write
    /// lock, which the application's writers wait on, while the merge waits for bytes; with a
    /// fast store it starts at once. `false` when `stop` fired first.
    pub async fn ready_to_merge(&self, stop: &tokio_util::sync::CancellationToken) -> bool {
        loop {
            self.arriving.arrival().check_stall();
            let (written, total, ended) = self.arriving.arrival().progress();
            if ended {
                return true;
            }
            let elapsed = self.began.elapsed().as_secs_f64();
            if let Some(total) = total
                && written > 0
                && elapsed > 0.0
            {
                let rest = total.saturating_sub(written) as f64 / (written as f64 / elapsed);
                if rest <= total as f64 / MERGE_BYTES_PER_SEC {
                    return true;
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
        }
    }

    /// Waits for the download's end.
    ///
    /// # Errors
    /// The store's error, or the object disappeared while it was read.
    pub async fn finished(&mut self) -> Result<(), Error> {
        let got = match self.ended.take() {
            Some(got) => got,
            None => joined(self.task.join_next().await),
        };
        match got? {
            Some(_) => Ok(()),
            None => Err(Error::Unusable(
                "the snapshot disappeared from the store while it was downloaded".into(),
            )),
        }
    }
}

/// The checks of a downloaded snapshot ([`verify`]), running on a thread of their own while the
/// apply thread merges it: the merge commits only once they passed (`db::restore`), so a refused
/// snapshot changes nothing, and a restore takes the longer of the two instead of both.
/// Clones share the one outcome.
#[derive(Clone)]
pub struct Verification(Arc<Outcome>);

/// The checks' outcome once they are done, and the signal that they are.
type Outcome = (Mutex<Option<Result<(), Error>>>, std::sync::Condvar);

impl std::fmt::Debug for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verification")
    }
}

impl Verification {
    /// Starts checking `path` against `meta` on a thread of its own, as it arrives when
    /// `arrival` is the download still writing it (see [`verify`]). Checks that cannot start or
    /// that panic end as [`Error::Unusable`] (tried again later), never as a wait without end.
    pub fn start(
        path: &Path,
        meta: &Meta,
        arrival: Option<Arc<db::arriving::Arrival>>,
    ) -> Verification {
        let v = Verification(Arc::new((Mutex::new(None), std::sync::Condvar::new())));
        let (p, m, done) = (path.to_path_buf(), meta.clone(), v.clone());
        let spawned = std::thread::Builder::new()
            .name("hl-verify".into())
            .spawn(move || {
                let started = Instant::now();
                let outcome = std::panic::catch_unwind(|| verify(&p, &m, arrival.as_ref()))
                    .unwrap_or_else(|_| {
                        Err(Error::Unusable("the snapshot checks panicked".into()))
                    });
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    ok = outcome.is_ok(),
                    "snapshot checked"
                );
                done.finish(outcome);
            });
        if let Err(e) = spawned {
            v.finish(Err(Error::Unusable(format!(
                "cannot start the snapshot checks: {e}"
            ))));
        }
        v
    }

    fn finish(&self, outcome: Result<(), Error>) {
        let (lock, ready) = &*self.0;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        ready.notify_all();
    }

    /// Blocks until the checks are done. A refusal stays [`Error::Refused`]; any other failure
    /// (the file could not be read) is [`Error::Unusable`].
    ///
    /// # Errors
    /// Why the snapshot must not be restored.
    pub fn wait(&self) -> Result<(), Error> {
        let (lock, ready) = &*self.0;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        while done.is_none() {
            done = ready.wait(done).unwrap_or_else(|e| e.into_inner());
        }
        match done.as_ref() {
            Some(Ok(())) | None => Ok(()),
            Some(Err(Error::Refused(why))) => Err(Error::Refused(why.clone())),
            Some(Err(e)) => Err(Error::Unusable(format!(
                "cannot check the snapshot: {}",
                crate::error_chain(e)
            ))),
        }
    }

    /// The outcome if the checks are done, without waiting.
    pub fn try_outcome(&self) -> Option<Result<(), Error>> {
        let done = self.0.0.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        done.then(|| self.wait())
    }

    /// [`Verification::wait`] without blocking the runtime.
    ///
    /// # Errors
    /// Why the snapshot must not be restored.
    pub async fn outcome(&self) -> Result<(), Error> {
        let v = self.clone();
        tokio::task::spawn_blocking(move || v.wait())
            .await
            .map_err(|e| Error::Unusable(format!("snapshot check task failed: {e}")))?
    }
}

/// Builds the configured store (no request is made yet). NATS needs the JetStream context.
///
/// # Errors
/// A store configuration that cannot work (the message names the key).
pub fn open_store(
    settings: &crate::config::Settings,
    js: &async_nats::jetstream::Context,
) -> Result<Arc<dyn Store>, Error> {
    use crate::config::SnapshotStore;
    match &settings.snapshot.store {
        SnapshotStore::Nats { replicas, bucket } => Ok(Arc::new(nats::NatsStore::new(
            js.clone(),
            bucket.clone(),
            *replicas,
        ))),
        SnapshotStore::S3(s3) => Ok(Arc::new(s3::S3Store::new(s3)?)),
        SnapshotStore::WebDav { url } => Ok(Arc::new(webdav::WebDavStore::new(
            url,
            settings.node_name(),
        )?)),
        SnapshotStore::Sftp(sftp) => Ok(Arc::new(Arc::new(sftp::SftpStore::new(
            sftp,
            settings.node_name(),
        )?))),
    }
}

fn now_ms() -> i64 {
    crate::unix_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks beside a merge: a sound file passes, a checksum that differs is a refusal
    /// (the node remembers that object), an unreadable file is not (it is tried again); every
    /// clone waits for the one outcome.
    #[test]
    fn verification_refuses_what_differs_and_shares_its_outcome() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("snap.db");
        Connection::open(&file)
            .expect("open")
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1)")
            .expect("fill");
        let (size, sha256, fnv) = digest(&file).expect("digest");
        let good = Meta {
            size: Some(size),
            sha256: Some(sha256),
            fnv_tag: Some(fnv),
            ..Meta::default()
        };
        let v = Verification::start(&file, &good, None);
        let other = v.clone();
        assert!(v.wait().is_ok());
        assert!(other.wait().is_ok());
        let bad = Meta {
            sha256: Some("00".repeat(32)),
            ..good.clone()
        };
        let refused = Verification::start(&file, &bad, None).wait();
        assert!(
            matches!(&refused, Err(Error::Refused(why)) if why.starts_with("SHA-256 is")),
            "{refused:?}"
        );
        let gone = Verification::start(&dir.path().join("missing.db"), &good, None).wait();
        assert!(matches!(&gone, Err(Error::Unusable(_))), "{gone:?}");
    }

    /// The checks of a file still arriving read it as it comes and pass once it is whole; a
    /// download that fails midway is not a refusal of the object (it is tried again), and a
    /// file that arrives whole but differs is one.
    #[test]
    fn verification_of_an_arriving_file_waits_for_it_and_tells_failures_from_refusals() {
        let dir = tempfile::tempdir().expect("dir");
        let source = dir.path().join("source.db");
        Connection::open(&source)
            .expect("open")
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
                 INSERT INTO t SELECT i, printf('%0200d', i) FROM n;",
            )
            .expect("fill");
        let (size, sha256, fnv) = digest(&source).expect("digest");
        let good = Meta {
            size: Some(size),
            sha256: Some(sha256),
            fnv_tag: Some(fnv),
            ..Meta::default()
        };
        let bytes = std::fs::read(&source).expect("read");
        let bad = Meta {
            sha256: Some("00".repeat(32)),
            ..good.clone()
        };
        for (name, meta, fail) in [
            ("good", &good, false),
            ("cut", &good, true),
            ("bad", &bad, false),
        ] {
            let file = dir.path().join(format!("{name}.db"));
            let arrival = db::arriving::Arrival::new();
            arrival.expect(Some(size));
            let writer = db::arriving::trickle(
                &bytes,
                &file,
                &arrival,
                256 * 1024,
                fail.then_some(768 * 1024),
            );
            let v = Verification::start(&file, meta, Some(Arc::clone(&arrival)));
            writer.join().expect("writer");
            let got = v.wait();
            match name {
                "good" => assert!(got.is_ok(), "{got:?}"),
                "cut" => assert!(
                    matches!(&got, Err(Error::Unusable(why)) if why.contains("connection reset")),
                    "{got:?}"
                ),
                _ => assert!(matches!(&got, Err(Error::Refused(_))), "{got:?}"),
            }
        }
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
        assert_eq!(ours, 0);
        assert_eq!(meta.positions, Some([("s-1".to_owned(), 42)].into()));
        let (size, sha256, fnv) = digest(&copy).expect("digest");
        let meta = Meta {
            size: Some(size),
            sha256: Some(sha256),
            fnv_tag: Some(fnv),
            ..meta
        };
        verify(&copy, &meta, None).expect("verifies");
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
