//! The capture triggers of a watched table: their names and SQL, as Go HarmonyLite renders them
//! (design §3.4). Used to install capture ([`super::cdc`]) and to check installed triggers still
//! match ([`super::ddl`]); a leaf, so those two need not import each other. Invariants: the
//! triggers have no condition (the applier's connection mutes them: [`super::apply`]). A
//! key-changing update is captured as a delete of the old key and an update of the new one, so
//! every replica drops the old row; a key changes when its bytes or type do ([`super::differs`]):
//! 'u0' → 'U0' under `NOCASE`, 1.0 → 1 in an untyped column.

use super::{GLOBAL_LOG, Table, change_log_name, differs, quote, quote_literal, same_value};

/// Unix milliseconds in trigger SQL, exactly as Go computes `created_at`.
const NOW_MS_SQL: &str = "CAST((strftime('%s','now') || substr(strftime('%f','now'),4)) AS INT)";

/// Every trigger name of a table: Go's three AFTER triggers, then two BEFORE ones (UNIQUE indexes).
pub(super) fn trigger_names(table: &str) -> [String; 5] {
    let log = change_log_name(table);
    [
        "on_delete",
        "on_insert",
        "on_update",
        "before_insert",
        "before_update",
    ]
    .map(|op| format!("{log}_{op}"))
}

/// The index keeping a rowid-keyed table's rowids through VACUUM ([`super::cdc::table_ddl`]).
pub(super) fn rowids_index(table: &Table) -> Option<String> {
    table
        .rowid_key
        .then(|| format!("{}_rowids", change_log_name(&table.name)))
}

/// The capture triggers of a table: (name, `CREATE TRIGGER` statement as SQLite stores it).
pub(super) fn triggers(table: &Table) -> Vec<(String, String)> {
    let log = change_log_name(&table.name);
    let qlog = quote(&log);
    let qtable = quote(&table.name);
    let val_cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| quote(&format!("val_{}", c.name)))
        .collect();
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
    let replaced = Replaced::new(table);
    // Go renders the triggers in sorted key order: delete, insert, update.
    let [
        on_delete,
        on_insert,
        on_update,
        before_insert,
        before_update,
    ] = trigger_names(&table.name);
    let mut all = vec![
        (on_delete, "AFTER delete", capture("OLD", "delete", "")),
        // The replaced rows' deletes go first: replicas delete them before the new image arrives.
        (
            on_insert,
            "AFTER insert",
            replaced.confirm.clone() + &capture("NEW", "insert", ""),
        ),
        (
            on_update,
            "AFTER update",
            replaced.confirm.clone()
                + &capture("OLD", "delete", &key_filter)
                + &capture("NEW", "update", ""),
        ),
    ];
    if !table.unique.is_empty() {
        all.push((before_insert, "BEFORE insert", replaced.candidates(None)));
        all.push((
            before_update,
            "BEFORE update",
            replaced.candidates(Some("OLD")),
        ));
    }
    all.into_iter()
        .map(|(name, when, body)| {
            let create = format!(
                "CREATE TRIGGER {}\n{when} ON {qtable}\nBEGIN\n{body}END",
                quote(&name)
            );
            (name, create)
        })
        .collect()
}

/// Rows an `INSERT OR REPLACE`/`UPDATE OR REPLACE` deletes via a UNIQUE index fire no delete
/// trigger (unless recursive triggers are on): replicas would keep them and hold the new row
/// forever. A BEFORE trigger records a `state = -2` delete (no global-log entry: invisible to the
/// publisher and Go) of each row sharing a UNIQUE value with the new image; the AFTER trigger
/// publishes those really gone and drops the rest (plain conflict aborted, `OR IGNORE` skipped,
/// index rules say not shared); the next BEFORE trigger drops what an ignored write left.
struct Replaced {
    log: String,
    table: String,
    /// The AFTER triggers' part (empty for a table without UNIQUE indexes).
    confirm: String,
    /// Per UNIQUE index: the condition that row `u` shares its value with `NEW`.
    shares: Vec<String>,
    columns: Vec<String>,
    keys: Vec<String>,
}

impl Replaced {
    fn new(table: &Table) -> Replaced {
        let (log, qtable) = (quote(&change_log_name(&table.name)), quote(&table.name));
        let keys: Vec<String> = table
            .pk_indexes()
            .iter()
            .map(|&i| table.columns[i].name.clone())
            .collect();
        // Whether the change-log row's key still exists in the table.
        let exists = format!(
            "EXISTS (SELECT 1 FROM {qtable} AS u WHERE {})",
            same_key(&keys, "u.", &format!("{log}.val_"))
        );
        let confirm = if table.unique.is_empty() {
            String::new()
        } else {
            format!(
                "INSERT INTO {global} (change_table_id, table_name)\n\
                 SELECT id, {literal} FROM {log} WHERE state = -2 AND NOT {exists} ORDER BY id;\n\
                 DELETE FROM {log} WHERE state = -2 AND {exists};\n\
                 UPDATE {log} SET state = 0 WHERE state = -2;\n",
                global = quote(GLOBAL_LOG),
                literal = quote_literal(&table.name),
            )
        };
        let shares = table
            .unique
            .iter()
            .map(|index| {
                let parts: Vec<String> = index
                    .iter()
                    .map(|(c, coll)| format!("u.{0} = NEW.{0} COLLATE {1}", quote(c), quote(coll)))
                    .collect();
                parts.join(" AND ")
            })
            .collect();
        Replaced {
            log,
            table: qtable,
            confirm,
            shares,
            columns: table.columns.iter().map(|c| c.name.clone()).collect(),
            keys,
        }
    }

    /// The BEFORE trigger's body: rows sharing a UNIQUE value with `NEW` (not `OLD`): `-2` deletes.
    fn candidates(&self, old: Option<&str>) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| quote(&format!("val_{c}")))
            .collect();
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("u.{}", quote(c)))
            .collect();
        let not_old = old.map_or(String::new(), |old| {
            format!(
                " AND NOT ({})",
                same_key(&self.keys, "u.", &format!("{old}."))
            )
        });
        let mut body = format!("DELETE FROM {} WHERE state = -2;\n", self.log);
        for shares in &self.shares {
            body.push_str(&format!(
                "INSERT INTO {log}({cols}, type, created_at, state)\n\
                 SELECT {values}, 'delete', {NOW_MS_SQL}, -2 FROM {table} AS u WHERE {shares}{not_old};\n",
                log = self.log,
                cols = cols.join(", "),
                values = values.join(", "),
                table = self.table,
            ));
        }
        body
    }
}

/// SQL true when the key `columns` of row `a` equal those of `b` (each a prefix: `u.`, or
/// `"<log>".val_` for a change-log row) as bytes and type.
fn same_key(columns: &[String], a: &str, b: &str) -> String {
    let parts: Vec<String> = columns
        .iter()
        .map(|c| same_value(&format!("{a}{}", quote(c)), &quote_prefixed(b, c)))
        .collect();
    parts.join(" AND ")
}

/// `prefix` + quoted `column`, where a prefix ending in `val_` belongs inside the quotes.
fn quote_prefixed(prefix: &str, column: &str) -> String {
    match prefix.strip_suffix("val_") {
        Some(row) => format!("{row}{}", quote(&format!("val_{column}"))),
        None => format!("{prefix}{}", quote(column)),
    }
}

/// Whether an application trigger on `table` is newer than our capture triggers. SQLite fires the
/// newest first, so its writes to the row (an `updated_at` touch) would be captured before the
/// statement's, and replicas end with the statement's image; recreating ours makes them newest.
pub(super) fn outrun(conn: &rusqlite::Connection, table: &str) -> rusqlite::Result<bool> {
    let rowid = |agg: &str, ours: bool| {
        format!(
            "(SELECT {agg}(rowid) FROM sqlite_schema WHERE type = 'trigger' \
             AND tbl_name = ?1 COLLATE NOCASE AND (substr(name, 1, ?2) = ?3) = {ours})"
        )
    };
    conn.query_row(
        &format!(
            "SELECT coalesce({} > {}, 0)",
            rowid("max", false),
            rowid("min", true)
        ),
        rusqlite::params![table, super::PREFIX.len() as i64, super::PREFIX],
        |r| r.get(0),
    )
}
