//! The running node: the [`Node`] handle every subsystem receives, built by [`setup`], run by
//! [`run`] (design §5.1, corrosion's shape). Setup failures are start-up errors: exit 1, or 2 for
//! conflicts an operator must resolve ([`StartError`]). Subsystems wired here: `snapshots` (store
//! and scheduler), `watchdog` (database file and schema drift). Invariants (the one fatal path and
//! the drain: [`run`]): one root `CancellationToken`, watched by every subsystem (or through a
//! token derived from it); nothing outlives [`run::run`]: tasks are joined or aborted, the apply
//! thread joined, the embedded broker stopped, the database lock released last.

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
