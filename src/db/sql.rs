//! SQL helpers for the `db` modules: binding wire values, one column of a query, a row as JSON. A
//! leaf (imports only [`super`] and [`crate::wire`]), so its users need not import each other.
//! [`Bind`] keeps a value's storage class and bytes (text by length: NUL bytes, non-UTF-8 survive).

use rusqlite::types::{FromSql, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, Params};

use crate::wire::Value;

/// A wire value bound as a statement parameter, unchanged.
pub(super) struct Bind<'a>(pub(super) &'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
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

/// A row as a JSON object, keys sorted (text as text, blobs as `x'…'` hex, so any value survives).
pub(super) fn row_json(row: &[(String, Value)]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = row
        .iter()
        .map(|(name, v)| {
            let v = match v {
                Value::Null => serde_json::Value::Null,
                Value::Integer(i) => (*i).into(),
                Value::Real(f) => (*f).into(),
                Value::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                Value::Blob(b) => format!("x'{}'", crate::hex(b)).into(),
            };
            (name.clone(), v)
        })
        .collect();
    serde_json::Value::Object(object).to_string()
}
