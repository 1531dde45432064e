//! The fast way to copy the database for a snapshot: the kernel copies the database file's bytes
//! (`copy_file_range`), when the file alone holds what the save's read transaction sees. SQLite's
//! backup API, the other way, copies page by page through the pager: about three times the CPU
//! for the same bytes.
//!
//! When the file holds the read transaction's snapshot: right after that transaction began, a
//! passive checkpoint from another connection reports the whole WAL backfilled (frames in the
//! log = frames checkpointed). Why this is enough, from SQLite's WAL rules:
//! - A reader with read mark `m` (it sees WAL frames up to at least `m`) stops every checkpoint
//!   at `m` and every restart of the WAL for as long as it reads. So backfilled ≤ `m` ≤ what it
//!   sees ≤ frames in the log, whatever the moments each was read at: "all backfilled" means the
//!   file holds exactly what the reader sees, and no checkpoint changes the file's content until
//!   the reader ends (a wal-index recovery after a crash elsewhere may rewrite pages, with the
//!   same bytes).
//! - A reader that began with the WAL wholly backfilled reads the file only (read mark 0) and
//!   holds lock slot 0, without which no checkpoint writes the file.
//!
//! Otherwise (a writer committed between the read's start and the checkpoint, or another
//! checkpoint was running), or when the copy fails in any way, the caller falls back to the
//! backup API.
//!
//! Invariant: no descriptor of the database file is ever closed by this process outside SQLite
//! — closing one drops every POSIX lock the process holds on the file, SQLite's own included —
//! so the one this module reads through is opened once and kept.

use std::fs::File;
use std::io::{self, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

/// Whether the database file by itself holds what a read transaction begun just before on
/// another connection sees (see the module header). Any error or doubt says no.
pub fn file_holds_read_snapshot(db_path: &Path) -> bool {
    let checked = (|| -> rusqlite::Result<(i64, i64, i64)> {
        let conn = Connection::open_with_flags(
            db_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
    })();
    match checked {
        // (busy, frames in the log, frames checkpointed); -1 frames: not in WAL mode.
        Ok((0, log, done)) => log >= 0 && log == done,
        Ok(_) => false,
        Err(e) => {
            tracing::debug!(error = %e, "cannot check the WAL before a snapshot copy; using the backup API");
            false
        }
    }
}

/// The process's own descriptor of the database file, opened on first use and never closed.
fn db_file(db_path: &Path) -> io::Result<&'static File> {
    static OPEN: Mutex<Vec<(PathBuf, &'static File)>> = Mutex::new(Vec::new());
    use std::os::unix::fs::MetadataExt as _;
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::fs::metadata(db_path)?;
    let same = |f: &File| {
        f.metadata()
            .is_ok_and(|m| (m.dev(), m.ino()) == (now.dev(), now.ino()))
    };
    // A file replaced under the same name gets a descriptor of its own (the old one stays open).
    if let Some((_, f)) = open.iter().find(|(p, f)| p == db_path && same(f)) {
        return Ok(f);
    }
    let file: &'static File = Box::leak(Box::new(File::open(db_path)?));
    open.push((db_path.to_owned(), file));
    Ok(file)
}

/// Copies the database file's bytes into a new file at `dest`. Only call it while
/// [`file_holds_read_snapshot`] holds (a read transaction keeps the file still). The standard
/// library copies file to file in the kernel (`copy_file_range`, else `sendfile`, else a buffer).
///
/// # Errors
/// I/O errors; the caller then copies with the backup API.
pub fn copy_db_file(db_path: &Path, dest: &Path) -> io::Result<u64> {
    let mut src = db_file(db_path)?;
    let len = src.metadata()?.len();
    // The descriptor is shared by every save of this file; saves run one at a time.
    src.seek(io::SeekFrom::Start(0))?;
    let mut out = File::create(dest)?;
    let copied = io::copy(&mut src.take(len), &mut out)?;
    if copied < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the database file is shorter than it was",
        ));
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_db(path: &Path) -> Connection {
        let c = Connection::open(path).expect("test setup");
        c.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .expect("test setup");
        c.execute_batch(
            "PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
        )
        .expect("test setup");
        c
    }

    /// A WAL database `a.db` in `dir` with one row, its writer, and a reader whose read
    /// transaction is open.
    fn writer_and_reader(dir: &Path) -> (PathBuf, Connection, Connection) {
        let path = dir.join("a.db");
        let writer = wal_db(&path);
        writer
            .execute("INSERT INTO t (v) VALUES ('before')", [])
            .expect("test setup");
        let reader = Connection::open(&path).expect("test setup");
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM t;")
            .expect("test setup");
        (path, writer, reader)
    }

    fn rows(path: &Path) -> i64 {
        let c = Connection::open(path).expect("test setup");
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("test setup")
    }

    #[test]
    fn the_copy_is_what_the_reader_saw_while_writers_go_on() {
        let dir = tempfile::tempdir().expect("test setup");
        let (path, writer, reader) = writer_and_reader(dir.path());
        assert!(file_holds_read_snapshot(&path), "the WAL was backfilled");
        // Commits and checkpoints after the read began change neither the file nor the copy.
        for i in 0..50 {
            writer
                .execute("INSERT INTO t (v) VALUES (?1)", [i.to_string()])
                .expect("test setup");
        }
        writer
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .expect("test setup");
        let dest = dir.path().join("copy.db");
        copy_db_file(&path, &dest).expect("test setup");
        reader.execute_batch("COMMIT").expect("test setup");
        assert_eq!(rows(&dest), 1);
        assert_eq!(rows(&path), 51);
    }

    #[test]
    fn a_commit_between_the_read_and_the_check_means_no() {
        let dir = tempfile::tempdir().expect("test setup");
        let (path, writer, reader) = writer_and_reader(dir.path());
        // The reader sees the frame of this commit's predecessor only; the checkpoint cannot
        // pass the reader, so the log is not wholly backfilled.
        writer
            .execute("INSERT INTO t (v) VALUES ('b')", [])
            .expect("test setup");
        assert!(!file_holds_read_snapshot(&path));
        reader.execute_batch("COMMIT").expect("test setup");
        assert!(file_holds_read_snapshot(&path), "nothing reads any more");
    }

    /// Seeded: a writer commits (inserts, updates, deletes, automatic checkpoints) in bursts
    /// while copies are taken. Every copy made by file must hold exactly what its read
    /// transaction saw, and be a sound database.
    #[test]
    fn copies_under_a_busy_writer_match_their_read_transaction() {
        // splitmix64, seeded: the same run every time.
        fn below(state: &mut u64, n: u64) -> u64 {
            *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("a.db");
        let setup = wal_db(&path);
        setup
            .execute_batch("PRAGMA wal_autocheckpoint = 8; INSERT INTO t (v) VALUES ('x');")
            .expect("test setup");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = 7u64;
                let c = Connection::open(&path).expect("test setup");
                c.busy_timeout(std::time::Duration::from_secs(5))
                    .expect("test setup");
                c.execute_batch("PRAGMA wal_autocheckpoint = 8")
                    .expect("test setup");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..1 + below(&mut rng, 20) {
                        let id = 1 + below(&mut rng, 400) as i64;
                        let sql = match below(&mut rng, 3) {
                            0 => {
                                "INSERT OR REPLACE INTO t (id, v) VALUES (?1, hex(randomblob(300)))"
                            }
                            1 => "UPDATE t SET v = v || 'u' WHERE id = ?1",
                            _ => "DELETE FROM t WHERE id = ?1",
                        };
                        c.execute(sql, [id]).expect("test setup");
                    }
                    std::thread::sleep(std::time::Duration::from_micros(below(&mut rng, 3000)));
                }
            })
        };
        let digest = |c: &Connection| -> rusqlite::Result<(i64, String)> {
            c.query_row(
                "SELECT count(*), coalesce(sum(length(v) * id), 0) || ':' || \
                 coalesce(group_concat(id), '') FROM (SELECT * FROM t ORDER BY id)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        };
        let reader = Connection::open(&path).expect("test setup");
        let mut by_file = 0;
        for i in 0..200 {
            reader.execute_batch("BEGIN").expect("test setup");
            let seen = digest(&reader).expect("test setup");
            if file_holds_read_snapshot(&path) {
                let dest = dir.path().join(format!("copy-{i}.db"));
                copy_db_file(&path, &dest).expect("test setup");
                let copy = Connection::open(&dest).expect("test setup");
                assert_eq!(digest(&copy).ok(), Some(seen), "copy {i}");
                let ok: String = copy
                    .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                    .expect("test setup");
                assert_eq!(ok, "ok");
                drop(copy);
                std::fs::remove_file(&dest).expect("test setup");
                by_file += 1;
            }
            reader.execute_batch("COMMIT").expect("test setup");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("test setup");
        assert!(
            by_file >= 10,
            "only {by_file} of 200 copies were made by file"
        );
    }
}
