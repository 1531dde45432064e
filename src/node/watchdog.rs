//! The database watchdog. SQLite would go on writing into an unlinked file that the application
//! (which opens the path) never sees, so a deleted or replaced database file stops the node. While
//! the schema matches what capture was installed for, the version seen is confirmed (publisher and
//! applier go on); a drift ends the generation with [`SchemaDrift`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::Subsystems;
use crate::db;

/// How often the database file's identity and the schema version are checked.
const DB_FILE_CHECK: Duration = Duration::from_millis(250);

/// The watchdog saw the schema drift from what capture was installed for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct SchemaDrift(pub(super) db::ddl::Drift);

/// The watchdog as the "database watchdog" subsystem (see the module header).
pub(super) fn spawn_watchdog(
    tasks: &mut Subsystems,
    node: &Node,
    tables: Vec<db::Table>,
    hash: String,
    confirmed: Arc<std::sync::atomic::AtomicI64>,
    poke: Arc<Notify>,
) {
    let (path, token) = (node.settings.db_path.clone(), node.root.clone());
    let watch = watch_database_file(path, tables, hash, confirmed, poke, token);
    super::spawn(tasks, "database watchdog", watch);
}

/// Checks the file's identity and the schema every [`DB_FILE_CHECK`] (or when poked); a drift
/// (the application's DDL, capture triggers dropped by someone else) ends the generation.
async fn watch_database_file(
    path: PathBuf,
    tables: Vec<db::Table>,
    hash: String,
    confirmed: Arc<std::sync::atomic::AtomicI64>,
    poke: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let identity = |m: std::fs::Metadata| (m.dev(), m.ino());
    let deleted = || {
        anyhow::anyhow!(
            "database file {} was deleted; stopping rather than replicating into a file nobody sees",
            path.display()
        )
    };
    // Deleted between the start-up and this task's first look: the same case.
    let opened = match std::fs::metadata(&path) {
        Ok(m) => identity(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(deleted()),
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("cannot stat database file {}", path.display())));
        }
    };
    let mut tick = tokio::time::interval(DB_FILE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut schema_seen: Option<i64> = None;
    // The connection and what capture was installed for, shared with each blocking check.
    let checked = Arc::new(Mutex::new((db::open(&path)?, tables, hash)));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
            _ = poke.notified() => {}
        }
        match std::fs::metadata(&path).map(identity) {
            Ok(now) if now == opened => {
                let (c, seen) = (Arc::clone(&checked), schema_seen.take());
                let drift = tokio::task::spawn_blocking(move || {
                    let guard = c.lock().unwrap_or_else(|p| p.into_inner());
                    let (conn, tables, hash) = &*guard;
                    db::ddl::drift(conn, tables, hash, seen)
                })
                .await
                .context("capture check failed")?;
                match drift {
                    Ok((version, drifted)) => {
                        schema_seen = Some(version);
                        if let Some(reason) = drifted {
                            return Err(SchemaDrift(reason).into());
                        }
                        confirmed.store(version, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) if e.is_fatal() => return Err(e.into()),
                    Err(_) => {}
                }
            }
            Ok(_) => anyhow::bail!(
                "database file {} was replaced by another file; stopping (restart to use the new one)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(deleted()),
            Err(_) => {}
        }
    }
}
