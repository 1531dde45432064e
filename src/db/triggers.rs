//! The capture triggers of a watched table: their names and their SQL, as Go HarmonyLite renders
//! them (design §3.4). Used to install capture ([`super::cdc`]) and to tell whether installed
//! triggers still match the table ([`super::ddl`]); a leaf, so that the two need not import each
//! other.
//!
//! Invariants:
//! - A trigger fires only while the guard table is empty (the applier's writes are never
//!   captured).
//! - An update that changes the key is captured as a delete of the old key and an update of the
//!   new one, so that every replica drops the old row. A key changes when its bytes or type do
//!   ([`super::differs`]): 'u0' → 'U0' under `NOCASE`, 1.0 → 1 in an untyped column.

use super::{GLOBAL_LOG, GUARD_TABLE, Table, change_log_name, differs, quote, quote_literal};

/// Unix milliseconds in trigger SQL, exactly as Go computes `created_at`.
const NOW_MS_SQL: &str = "CAST((strftime('%s','now') || substr(strftime('%f','now'),4)) AS INT)";

/// The three trigger names of a table.
pub(super) fn trigger_names(table: &str) -> [String; 3] {
    let log = change_log_name(table);
    ["delete", "insert", "update"].map(|op| format!("{log}_on_{op}"))
}

/// The three capture triggers of a table: (name, `CREATE TRIGGER` statement as SQLite stores it).
pub(super) fn triggers(table: &Table) -> Vec<(String, String)> {
    let log = change_log_name(&table.name);
    let qlog = quote(&log);
    let qtable = quote(&table.name);
    let val_cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| quote(&format!("val_{}", c.name)))
        .collect();
    let guard = format!("NOT EXISTS (SELECT 1 FROM {})", quote(GUARD_TABLE));
    let capture = |row: &str, op: &str, filter: &str| -> String {
        let values: Vec<String> = table
            .columns
            .iter()
            .map(|c| format!("{row}.{}", quote(&c.name)))
            .collect();
        format!(
            "INSERT INTO {qlog}({cols}, type, created_at, state)\n\
             SELECT {values}, '{op}', {NOW_MS_SQL}, 0{filter};\n\
             INSERT INTO {global} (change_table_id, table_name)\n\
             SELECT last_insert_rowid(), {name}{filter};\n",
            cols = val_cols.join(", "),
            values = values.join(", "),
            global = quote(GLOBAL_LOG),
            name = quote_literal(&table.name),
        )
    };
    // The key changed: the old row is gone from the point of view of every replica.
    let key_changed: Vec<String> = table
        .pk_indexes()
        .iter()
        .map(|&i| {
            let c = quote(&table.columns[i].name);
            differs(&format!("OLD.{c}"), &format!("NEW.{c}"))
        })
        .collect();
    let key_filter = format!(" WHERE {}", key_changed.join(" OR "));
    // Go renders the triggers in sorted key order: delete, insert, update.
    let [on_delete, on_insert, on_update] = trigger_names(&table.name);
    [
        (on_delete, "delete", capture("OLD", "delete", "")),
        (on_insert, "insert", capture("NEW", "insert", "")),
        (
            on_update,
            "update",
            capture("OLD", "delete", &key_filter) + &capture("NEW", "update", ""),
        ),
    ]
    .into_iter()
    .map(|(name, op, body)| {
        let create = format!(
            "CREATE TRIGGER {}\nAFTER {op} ON {qtable}\nWHEN {guard}\nBEGIN\n{body}END",
            quote(&name)
        );
        (name, create)
    })
    .collect()
}
