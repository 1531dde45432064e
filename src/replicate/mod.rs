//! Replication, the only module joining [`crate::db`], [`crate::stream`] and [`crate::seqmap`]:
//! [`publish`] moves local changes to JetStream, [`apply`] every node's (ours included) into
//! SQLite; [`flow`] paces publishers to the slowest live node; [`watch`] notices local commits.

pub mod apply;
pub mod catchup;
pub mod consume;
pub mod flow;
pub mod publish;
pub mod watch;

/// Locks `m`, taking the value as it is when a panicking holder poisoned the lock.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
