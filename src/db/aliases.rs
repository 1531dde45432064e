//! The names this node's schema had before: tables and columns the application renamed or dropped,
//! as [`crate::db::ddl::follow`] recorded them in `__harmonylite__schema_aliases` (why:
//! [`crate::db::ddl`]). Keys are lower-cased: SQLite compares names ASCII case-insensitively.

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;

use super::{ALIAS_TABLE, Error, quote};

#[derive(Debug, Default, Clone)]
pub struct Aliases {
    /// Lower-cased old table name → current name.
    tables: HashMap<String, String>,
    /// (lower-cased current table, lower-cased old column) → current column.
    columns: HashMap<(String, String), String>,
    /// Lower-cased names of tables this node dropped.
    dropped: HashSet<String>,
    /// (lower-cased table, lower-cased column) of columns this node's tables no longer have.
    dropped_columns: HashSet<(String, String)>,
}

impl Aliases {
    /// Reads the recorded aliases (none if the table does not exist yet).
    pub fn load(conn: &Connection) -> Result<Aliases, Error> {
        let mut aliases = Aliases::default();
        if !super::has_table(conn, ALIAS_TABLE)? {
            return Ok(aliases);
        }
        let mut stmt = conn.prepare(&format!(
            "SELECT kind, scope, old_name, new_name FROM {}",
            quote(ALIAS_TABLE)
        ))?;
        let rows: Vec<(String, String, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        for (kind, scope, old, new) in rows {
            match kind.as_str() {
                "table" => {
                    aliases.tables.insert(old.to_lowercase(), new);
                }
                "column" => {
                    aliases
                        .columns
                        .insert((scope.to_lowercase(), old.to_lowercase()), new);
                }
                "dropped" => {
                    aliases.dropped.insert(old.to_lowercase());
                }
                "dropped_column" => {
                    aliases
                        .dropped_columns
                        .insert((scope.to_lowercase(), old.to_lowercase()));
                }
                _ => {}
            }
        }
        Ok(aliases)
    }

    /// The current name of a table known here under an older one.
    pub fn table(&self, name: &str) -> Option<&str> {
        self.tables.get(&name.to_lowercase()).map(String::as_str)
    }

    /// The older names (lower-cased) of a table known here as `current`.
    pub fn old_tables(&self, current: &str) -> Vec<String> {
        self.tables
            .iter()
            .filter(|(_, new)| new.eq_ignore_ascii_case(current))
            .map(|(old, _)| old.clone())
            .collect()
    }

    /// The older names (lower-cased) of column `current` of `table` (current name).
    pub fn old_columns(&self, table: &str, current: &str) -> Vec<String> {
        let table = table.to_lowercase();
        self.columns
            .iter()
            .filter(|((t, _), new)| *t == table && new.eq_ignore_ascii_case(current))
            .map(|((_, old), _)| old.clone())
            .collect()
    }

    /// The current name of a column of `table` (current name) known under an older one.
    pub fn column(&self, table: &str, name: &str) -> Option<&str> {
        self.columns
            .get(&(table.to_lowercase(), name.to_lowercase()))
            .map(String::as_str)
    }

    /// Whether `table` (current name) no longer has a column of that name here.
    pub fn dropped_column(&self, table: &str, name: &str) -> bool {
        self.dropped_columns
            .contains(&(table.to_lowercase(), name.to_lowercase()))
    }

    pub fn dropped(&self, name: &str) -> bool {
        self.dropped.contains(&name.to_lowercase())
    }
}
