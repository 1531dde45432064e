//! The running node: one cheap-clone [`Node`] handle that every subsystem receives, built by
//! [`setup`] and run by [`run`] (design §5.1, corrosion's shape). Setup failures are start-up
//! errors: exit 1, or exit 2 for conflicts an operator must resolve ([`StartError`]). `snapshots`
//! wires the snapshot store and scheduler; `watchdog` stops the node when its database file is
//! deleted or replaced, and ends a generation when the schema drifts.
//!
//! Invariants (the one fatal path and the drain: [`run`]):
//! - One root `CancellationToken`; every subsystem watches it (or a token derived from it).
//! - Nothing outlives [`run::run`]: tasks are joined or aborted, the apply thread joined, the
//!   embedded broker stopped, the database lock released last.

pub mod run;
pub mod setup;
mod snapshots;
mod watchdog;

/// Start-up refusals that a restart cannot fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cluster disagrees with this node's configuration or identity.
    #[error("{0}")]
    Conflict(String),
}

pub use crate::handle::{Inner, Node, Observers};

/// The running subsystems, each ending with its name and outcome.
type Subsystems = tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>;

/// Spawns subsystem `name`; ending before shutdown, even without an error, fails the node.
fn spawn(
    tasks: &mut Subsystems,
    name: &'static str,
    work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
) {
    tasks.spawn(async move { (name, work.await) });
}

/// Spawns subsystem `name`, whose work ends only on shutdown.
fn spawn_forever(
    tasks: &mut Subsystems,
    name: &'static str,
    work: impl Future<Output = ()> + Send + 'static,
) {
    spawn(tasks, name, async move {
        work.await;
        Ok(())
    });
}
