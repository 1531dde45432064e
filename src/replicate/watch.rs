//! Noticing local commits within milliseconds: inotify (via `notify`) on the database directory,
//! filtered to the database file and its `-wal` and `-shm` companions (upstream-behaviour §4.9).
//! Why the directory: SQLite may recreate `-wal` and `-shm`, and a file's watch dies with it. The
//! publisher also scans on a timer: a missed notification delays a change, never loses it.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// How long the watcher pauses after a relevant event (see the callback): the most a commit can
/// wait to be noticed behind an earlier one, which has woken the publisher already.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(1);

/// A running watcher; dropping it stops watching.
pub struct DbWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching `db_path`; every relevant change calls `wake.notify_one()`.
pub fn watch(db_path: &Path, wake: Arc<Notify>) -> notify::Result<DbWatcher> {
    let dir = crate::config::data_root_dir(db_path);
    let base = db_path.file_name().map(OsString::from).unwrap_or_default();
    let names: Vec<OsString> = ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut n = base.clone();
            n.push(suffix);
            n
        })
        .collect();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        let relevant = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|f| names.iter().any(|n| n == f)));
        if relevant {
            wake.notify_one();
            // Pause this thread: while nobody reads the inotify queue, the kernel merges each new
            // event into an identical last one. Without the pause a large write (a restore writes
            // the WAL page by page) costs an event and a wake-up per page: a fifth of its time.
            std::thread::sleep(COALESCE);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(DbWatcher { _watcher: watcher })
}
