//! Which local table, columns and row an event names.
//!
//! Table names match exactly, then case-insensitively (as SQLite's do); names this node renamed are
//! followed ([`crate::db::ddl::Aliases`]), columns it dropped left out of older events. Wire names
//! are only looked up: the local spelling is used from then on (an injection attempt is just an
//! unknown table). A row is its primary key as a [`Key`]: each value's storage class and exact
//! bytes (equal keys are equal bytes; values compare so: [`same_value`]). Limit (documented): rows
//! sharing a primary key containing NULL (SQLite allows it in rowid tables) look alike on the wire.

use super::State;
use crate::wire::{ChangeEvent, Value};

/// A primary key, encoded with its storage classes so that equal keys are equal bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Vec<u8>);

impl Key {
    /// Encodes key values (type tag, then exact bytes).
    pub fn of<'v>(values: impl IntoIterator<Item = &'v Value>) -> Key {
        let mut out = Vec::with_capacity(16);
        for v in values {
            match v {
                Value::Null => out.push(b'n'),
                Value::Integer(i) => {
                    out.push(b'i');
                    out.extend_from_slice(&i.to_be_bytes());
                }
                Value::Real(f) => {
                    out.push(b'r');
                    out.extend_from_slice(&f.to_bits().to_be_bytes());
                }
                Value::Text(t) | Value::Blob(t) => {
                    out.push(if matches!(v, Value::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(t.len() as u64).to_be_bytes());
                    out.extend_from_slice(t);
                }
            }
        }
        Key(out)
    }
}

/// Exact equality of two stored values: same storage class and bytes (reals: same bits, or equal).
pub(super) fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits() || x == y,
        _ => a == b,
    }
}

impl State {
    pub(super) fn table_of(&self, name: &str) -> Option<usize> {
        self.by_name
            .get(name)
            .or_else(|| self.folded.get(&name.to_lowercase()))
            .copied()
    }

    /// The local table an event names, following this node's renames.
    pub(super) fn resolve_table(&self, name: &str) -> Option<usize> {
        self.table_of(name)
            .or_else(|| self.aliases.table(name).and_then(|n| self.table_of(n)))
    }

    /// The event with the current names of renamed columns (and of its table), if any differ.
    pub(super) fn renamed(&self, t: usize, event: &ChangeEvent) -> Option<ChangeEvent> {
        let table = &self.tables[t];
        let mut copy: Option<ChangeEvent> = None;
        if event.table != table.name {
            copy = Some(event.clone());
        }
        let mut gone: Vec<usize> = Vec::new();
        for (i, (name, _)) in event.row.iter().enumerate() {
            if table.column_index(name).is_some() {
                continue;
            }
            if let Some(new) = self.aliases.column(&table.name, name) {
                let c = copy.get_or_insert_with(|| event.clone());
                c.row[i].0 = new.to_owned();
            } else if self.aliases.dropped_column(&table.name, name) {
                gone.push(i);
            }
        }
        if !gone.is_empty() {
            let c = copy.get_or_insert_with(|| event.clone());
            let mut i = 0;
            c.row.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
        }
        if let Some(c) = &mut copy {
            c.table = table.name.clone();
        }
        copy
    }

    /// The key of `event` as it arrived, if it carries every key column.
    pub(super) fn wire_key(&self, t: usize, event: &ChangeEvent) -> Option<Key> {
        let table = &self.tables[t];
        let mut values = Vec::with_capacity(self.pks[t].len());
        for &p in &self.pks[t] {
            let name = &table.columns[p].name;
            let v = event
                .row
                .iter()
                .find(|(n, _)| n == name)
                .or_else(|| event.row.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))?;
            values.push(&v.1);
        }
        Some(Key::of(values))
    }

    /// The event's columns (local indexes) and its key columns' positions among them, if all exist.
    pub(super) fn layout(&self, t: usize, event: &ChangeEvent) -> Option<(Vec<usize>, Vec<usize>)> {
        let cols: Vec<usize> = event
            .row
            .iter()
            .map(|(name, _)| self.tables[t].column_index(name))
            .collect::<Option<_>>()?;
        let key_pos: Vec<usize> = self.pks[t]
            .iter()
            .map(|&p| cols.iter().position(|&c| c == p))
            .collect::<Option<_>>()?;
        Some((cols, key_pos))
    }
}
