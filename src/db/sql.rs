//! SQL helpers shared by the modules that write to the database on the applier's behalf
//! ([`super::apply`], [`super::restore`], [`super::ddl`]): binding wire values, the guarded
//! write transaction, and reading one column of a query.
//!
//! This is a leaf: it imports only [`super`]'s shared names and [`crate::wire`], never another
//! module of `db`, so the modules that use it do not import each other for it.
//!
//! Invariants:
//! - A [`Bind`] binds a value exactly as it arrived: same storage class, same bytes (text with an
//!   explicit length, so NUL bytes and non-UTF-8 text survive).
//! - Our writes happen only between [`begin_guarded`] (or [`set_guard`] inside the caller's own
//!   write transaction) and [`commit_guarded`]: while the guard row exists the capture triggers
//!   do not fire (design §3.4), and it is removed in the same transaction, so no application
//!   write ever sees it.

use rusqlite::types::{FromSql, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, Params, TransactionBehavior};

use super::{GUARD_TABLE, quote};
use crate::wire::Value;

/// A wire value bound as a statement parameter, unchanged.
pub(super) struct Bind<'a>(pub(super) &'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            // Bound with an explicit length: NUL bytes and non-UTF-8 text survive.
            Value::Text(t) => ValueRef::Text(t),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// The first column of every row `sql` returns (names, mostly).
pub(super) fn column<T: FromSql>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
) -> rusqlite::Result<Vec<T>> {
    let mut stmt = conn.prepare(sql)?;
    stmt.query_map(params, |r| r.get(0))?.collect()
}

/// Opens our write transaction with the guard row in place, so our writes are not captured.
pub(super) fn begin_guarded(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    set_guard(&tx)?;
    Ok(tx)
}

/// Sets the guard row inside the caller's write transaction: our writes from now until
/// [`commit_guarded`] are not captured.
pub(super) fn set_guard(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT OR IGNORE INTO {} (id) VALUES (1)",
        quote(GUARD_TABLE)
    ))?
    .execute([])?;
    Ok(())
}

/// Removes the guard row and commits.
pub(super) fn commit_guarded(tx: rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached(&format!("DELETE FROM {}", quote(GUARD_TABLE)))?
        .execute([])?;
    tx.commit()
}
