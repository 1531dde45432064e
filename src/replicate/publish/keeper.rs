//! The change-log keeper: retires what the publisher is done with (the [`super::Outbox`]) and
//! deletes old change-log rows, in one write transaction per cleanup interval.
//!
//! Every commit of ours fails (SQLITE_BUSY) an application's deferred transaction that has read but
//! not yet written, and so does its first write while we hold the write lock. So the keeper commits
//! rarely, at a quiet moment: no other process in a read transaction before it starts or while it
//! runs (it looks every few statements, rolls back at once and retries shortly).
//!
//! Invariants:
//! - A batch stays in the outbox until it is committed (a restore reads the outbox).
//! - Without a quiet moment for [`FORCE_AFTER`], or with [`FORCE_BACKLOG`] changes waiting, the
//!   keeper commits regardless; on shutdown it always does.
//! - Only a fatal database error (disk full, read-only, corrupt, I/O) stops it, and the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db;
use crate::db::changelog::Retirement;
use crate::replicate::lock;

use super::{LocalLog, Outbox, SharedLog};

/// How long one housekeeping attempt waits for application read transactions to end.
const QUIET_WAIT: Duration = Duration::from_millis(250);
/// How long the application must have been out of any read transaction before we commit: a
/// pause in its work, so that it is unlikely to begin one during our short commit.
const QUIET_SUSTAIN: Duration = Duration::from_millis(20);
/// How soon an attempt that found no quiet moment is tried again.
const QUIET_RETRY: Duration = Duration::from_millis(100);
/// Housekeeping commits regardless of application readers after no success for this long...
const FORCE_AFTER: Duration = Duration::from_secs(60);
/// ... or when this many changes wait to be retired (bounds memory).
const FORCE_BACKLOG: usize = 100_000;

/// Runs the keeper (module header) every `cleanup_interval` and once more on shutdown.
/// `positions` (per shard, the last applied sequence) is given when this node applies its own
/// events: rows are then kept until their event has come back.
pub async fn keep(
    log: SharedLog,
    outbox: Outbox,
    settings: Arc<Settings>,
    positions: Option<Arc<[AtomicU64]>>,
    shutdown: CancellationToken,
) -> Result<(), db::Error> {
    let period = settings.cleanup_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let probe = Arc::new(db::ReaderProbe::open(&settings.db_path));
    let mut last_done = Instant::now();
    let mut overdue = false;
    loop {
        let stopping = tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
            _ = tokio::time::sleep(QUIET_RETRY), if overdue => false,
        };
        // A copy: the batch stays in the outbox until committed, for a restore prepared meanwhile
        // (taken out, they would look pending, and it would keep their rows over newer values).
        let batch = lock(&outbox).clone();
        let force = stopping || last_done.elapsed() >= FORCE_AFTER || batch.len() >= FORCE_BACKLOG;
        if force && !stopping {
            // The one commit of ours that may fail an application transaction: worth a line.
            tracing::debug!(
                since_ms = last_done.elapsed().as_millis() as u64,
                waiting = batch.len(),
                "change-log cleanup found no quiet moment; committing regardless"
            );
        }
        let horizon = crate::clock::unix_ms() - period.as_millis() as i64;
        let applied: Option<Vec<(String, u64)>> = positions.as_ref().map(|p| {
            p.iter()
                .enumerate()
                .map(|(i, a)| {
                    (
                        settings.stream_name(i as u64 + 1),
                        a.load(Ordering::Relaxed),
                    )
                })
                .collect()
        });
        let outcome = match attempt(&log, &probe, batch, force, horizon, applied).await {
            Ok((_, Ok(None))) => {
                // No quiet moment: the batch stays in the outbox; try again shortly.
                overdue = true;
                continue;
            }
            Ok((batch, Ok(Some(count)))) => {
                lock(&outbox).remove_front(&batch);
                last_done = Instant::now();
                overdue = false;
                Ok(Ok(count))
            }
            Ok((_, Err(e))) => Ok(Err(e)),
            Err(e) => Err(e),
        };
        report(outcome, &mut failing, last_done)?;
        if stopping {
            return Ok(());
        }
    }
}

/// One attempt's batch and outcome: `Ok(None)` when no quiet moment came or an application
/// reader appeared meanwhile (rolled back, nothing written), else the count the cleanup reports.
type Attempt = (Retirement, Result<Option<usize>, db::Error>);

/// One attempt, in a blocking thread: waits for a quiet moment (unless `force`d), then retires
/// `batch` and deletes old rows in one transaction ([`Attempt`]).
async fn attempt(
    log: &SharedLog,
    probe: &Arc<Option<Arc<db::ReaderProbe>>>,
    batch: Retirement,
    force: bool,
    horizon: i64,
    applied: Option<Vec<(String, u64)>>,
) -> Result<Attempt, tokio::task::JoinError> {
    let shared = Arc::clone(log);
    let quiet = Arc::clone(probe);
    tokio::task::spawn_blocking(move || {
        let mut guard = lock(&shared);
        let LocalLog { conn, log } = &mut *guard;
        let probe = quiet.as_deref();
        if !force && !probe.is_none_or(|p| p.wait_quiet_for(QUIET_SUSTAIN, QUIET_WAIT)) {
            return (batch, Ok(None));
        }
        // Asked throughout: an application reader appearing meanwhile rolls it back at once.
        let undisturbed = || force || probe.is_none_or(|p| !p.others_reading());
        let outcome = log.housekeep(conn, &batch, horizon, applied.as_deref(), &undisturbed);
        (batch, outcome)
    })
    .await
}

/// Logs a writing attempt's outcome (one warning per failing episode); returns only fatal errors.
fn report(
    outcome: Result<Result<usize, db::Error>, tokio::task::JoinError>,
    failing: &mut bool,
    last_done: Instant,
) -> Result<(), db::Error> {
    match outcome {
        Ok(Ok(count)) => {
            if std::mem::take(failing) {
                tracing::info!("Change-log cleanup works again");
            }
            if count > 0 {
                tracing::debug!(count, "Cleaned up DB change logs");
            }
        }
        Ok(Err(e)) => {
            // The batch stays queued, pending in the database (a restart finds it in the stream).
            if e.is_fatal() {
                return Err(e);
            }
            if e.is_busy() && last_done.elapsed() < FORCE_AFTER {
                // Another transaction held the lock (a snapshot restore can take seconds):
                // the next attempt comes soon enough. Still locked after a minute: warn.
                tracing::debug!(error = %crate::error_chain(&e), "change-log cleanup waited too long for the lock; retrying");
            } else {
                if !*failing {
                    tracing::warn!(error = %crate::error_chain(&e), "Unable to cleanup change logs");
                }
                *failing = true;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cleanup task failed"),
    }
    Ok(())
}
