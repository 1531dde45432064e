//! One writer of the convergence test: the application on one node, its random statements
//! (every key kind, re-spelled keys, `OR REPLACE`, UNIQUE swaps, bulk inserts, VACUUM) and the
//! I1 check it makes before touching its own rows again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::Value;

use super::{Key, Model, OWNED, Rng, Row, any_value, key_id, read_row};

/// One writer: the application on one node, owning its own key ranges.
pub(super) struct Writer {
    w: usize,
    conn: Connection,
    rng: Rng,
    model: Arc<Mutex<Model>>,
    /// Keys this writer owns that exist (by table).
    live: Vec<Vec<Vec<Value>>>,
    next_id: i64,
    tmp: u64,
    /// The people this writer inserted with an auto id (phase 2).
    pub(super) emails: Vec<String>,
}

/// A change made inside a transaction, applied to the model after COMMIT.
type Pending = Vec<(Key, Option<Row>)>;

impl Writer {
    pub(super) fn new(
        w: usize,
        db: &std::path::Path,
        rng: Rng,
        model: Arc<Mutex<Model>>,
    ) -> Writer {
        let conn = Connection::open(db).expect("writer db");
        conn.busy_timeout(Duration::from_secs(10)).expect("timeout");
        Writer {
            w,
            conn,
            rng,
            model,
            live: vec![Vec::new(); OWNED.len()],
            next_id: 0,
            tmp: 0,
            emails: Vec::new(),
        }
    }

    fn fresh_int(&mut self) -> i64 {
        self.next_id += 1 + self.rng.below(3) as i64;
        (self.w as i64 + 1) * 10_000_000 + self.next_id
    }

    fn fresh_key(&mut self, t: usize) -> Vec<Value> {
        let n = self.fresh_int();
        match t {
            1 => {
                // Writer 0 owns the NULL key of strs.
                if self.w == 0 && !self.live[1].contains(&vec![Value::Null]) && self.rng.chance(30)
                {
                    vec![Value::Null]
                } else {
                    vec![Value::Text(format!("w{}-{n}", self.w))]
                }
            }
            2 => vec![Value::Text(format!("w{}", self.w)), Value::Integer(n)],
            5 => vec![Value::Text(format!("w{}-n{n}", self.w))],
            6 if self.rng.chance(50) => vec![Value::Real(n as f64)],
            _ => vec![Value::Integer(n)],
        }
    }

    fn unique(&mut self) -> Value {
        self.tmp += 1;
        Value::Text(format!("w{}-u{}", self.w, self.tmp))
    }

    /// Checks I1 for a row about to be touched: it holds what this writer committed last.
    fn check(&self, k: &Key, seed: u64, pending: &Pending) -> rusqlite::Result<()> {
        let now = read_row(&self.conn, k)?;
        let model = self.model.lock().expect("model");
        // What this transaction already did to the row counts first.
        let want = match pending.iter().rev().find(|(pk, _)| pk == k) {
            Some((_, row)) => row.as_ref(),
            None => model.rows.get(&key_id(k)),
        };
        if now.as_ref() != want {
            let earlier = now
                .as_ref()
                .is_some_and(|r| model.history.get(&key_id(k)).is_some_and(|h| h.contains(r)));
            panic!(
                "seed {seed}: I1 violated on node {}: {} holds {now:?}, the application committed {want:?} \
                 ({})",
                self.w + 1,
                key_id(k),
                if earlier {
                    "an earlier value of this node's came back"
                } else {
                    "a value this node never committed there"
                }
            );
        }
        Ok(())
    }

    fn pick(&mut self, t: usize) -> Option<Vec<Value>> {
        let n = self.live[t].len() as u64;
        (n > 0).then(|| self.live[t][self.rng.below(n) as usize].clone())
    }

    /// One random statement (or a few that belong together); returns the model changes.
    fn statement(&mut self, seed: u64, pending: &mut Pending) -> rusqlite::Result<()> {
        let t = self.rng.below(OWNED.len() as u64) as usize;
        let existing = self.pick(t);
        let op = self.rng.below(10);
        match (op, existing) {
            // Insert a new row.
            (0..=3, _) | (_, None) => {
                let key = self.fresh_key(t);
                let k = (t, key.clone());
                self.check(&k, seed, pending)?;
                let v = any_value(&mut self.rng);
                let n = any_value(&mut self.rng);
                let u = if self.rng.chance(70) {
                    self.unique()
                } else {
                    Value::Null
                };
                let conn = &self.conn;
                match t {
                    0 => conn.execute(
                        "INSERT INTO ints (id, u, n, v) VALUES (?1, ?2, ?3, ?4)",
                        rusqlite::params![key[0], u, n, v],
                    )?,
                    1 => conn.execute(
                        "INSERT INTO strs (k, v, d, b) VALUES (?1, ?2, ?3, ?4)",
                        rusqlite::params![key[0], v, n, Value::Integer(self.rng.below(3) as i64)],
                    )?,
                    2 => conn.execute(
                        "INSERT INTO comp (a, b, v) VALUES (?1, ?2, ?3)",
                        rusqlite::params![key[0], key[1], v],
                    )?,
                    3 => conn.execute(
                        "INSERT INTO norow (rowid, v, n) VALUES (?1, ?2, ?3)",
                        rusqlite::params![key[0], v, n],
                    )?,
                    5 | 6 => conn.execute(
                        &format!("INSERT INTO {} (k, v) VALUES (?1, ?2)", OWNED[t].0),
                        rusqlite::params![key[0], v],
                    )?,
                    _ => conn.execute(
                        "INSERT INTO strict (id, v) VALUES (?1, ?2)",
                        rusqlite::params![key[0], v],
                    )?,
                };
                self.live[t].push(key);
                pending.push((k.clone(), read_row(conn, &k)?));
            }
            // Update values.
            (4..=6, Some(key)) => {
                let k = (t, key.clone());
                self.check(&k, seed, pending)?;
                let v = any_value(&mut self.rng);
                let sql = match t {
                    0 => "UPDATE ints SET v = ?1, n = coalesce(n, 0) + 1 WHERE id IS ?2",
                    1 => "UPDATE strs SET v = ?1 WHERE k IS ?2",
                    2 => "UPDATE comp SET v = ?1 WHERE a = ?2 AND b = ?3",
                    3 => "UPDATE norow SET v = ?1 WHERE rowid = ?2",
                    5 => "UPDATE names SET v = ?1 WHERE k IS ?2",
                    6 => "UPDATE loose SET v = ?1 WHERE k IS ?2",
                    _ => "UPDATE strict SET v = ?1 WHERE id = ?2",
                };
                let mut params = vec![v];
                params.extend(key.iter().cloned());
                self.conn.execute(sql, rusqlite::params_from_iter(params))?;
                pending.push((k.clone(), read_row(&self.conn, &k)?));
            }
            // Delete.
            (7, Some(key)) => {
                let k = (t, key.clone());
                self.check(&k, seed, pending)?;
                let (table, keys, _) = OWNED[t];
                let conds: Vec<String> = keys
                    .split(", ")
                    .enumerate()
                    .map(|(i, c)| format!("{c} IS ?{}", i + 1))
                    .collect();
                self.conn.execute(
                    &format!("DELETE FROM {table} WHERE {}", conds.join(" AND ")),
                    rusqlite::params_from_iter(key.iter()),
                )?;
                self.live[t].retain(|x| *x != key);
                pending.push((k, None));
            }
            // A key re-spelled (other case, other numeric type): a key change everywhere.
            (8, Some(key)) if t >= 5 && self.rng.chance(60) => {
                self.respell(t, key, seed, pending)?
            }
            // Primary-key change (a move to a fresh key).
            (8, Some(key)) if t != 2 => {
                let old = (t, key.clone());
                self.check(&old, seed, pending)?;
                let new_key = self.fresh_key(t);
                let new = (t, new_key.clone());
                self.check(&new, seed, pending)?;
                let (table, keys, _) = OWNED[t];
                self.conn.execute(
                    &format!("UPDATE {table} SET {keys} = ?1 WHERE {keys} IS ?2"),
                    rusqlite::params![new_key[0], key[0]],
                )?;
                self.live[t].retain(|x| *x != key);
                self.live[t].push(new_key);
                pending.push((old, None));
                pending.push((new.clone(), read_row(&self.conn, &new)?));
            }
            // `INSERT/UPDATE OR REPLACE` taking another of our rows' UNIQUE value.
            (_, Some(_)) if self.rng.chance(50) => self.replace(seed, pending)?,
            // UNIQUE swap between two of our ints rows (through a temporary value).
            (_, Some(_)) => {
                let (Some(a), Some(b)) = (self.pick(0), self.pick(0)) else {
                    return Ok(());
                };
                if a == b {
                    return Ok(());
                }
                let (ka, kb) = ((0, a.clone()), (0, b.clone()));
                self.check(&ka, seed, pending)?;
                self.check(&kb, seed, pending)?;
                let tmp = self.unique();
                let conn = &self.conn;
                let ua: Value =
                    conn.query_row("SELECT u FROM ints WHERE id = ?1", [&a[0]], |r| r.get(0))?;
                let ub: Value =
                    conn.query_row("SELECT u FROM ints WHERE id = ?1", [&b[0]], |r| r.get(0))?;
                conn.execute(
                    "UPDATE ints SET u = ?1 WHERE id = ?2",
                    rusqlite::params![tmp, a[0]],
                )?;
                conn.execute(
                    "UPDATE ints SET u = ?1 WHERE id = ?2",
                    rusqlite::params![ua, b[0]],
                )?;
                conn.execute(
                    "UPDATE ints SET u = ?1 WHERE id = ?2",
                    rusqlite::params![ub, a[0]],
                )?;
                pending.push((ka.clone(), read_row(conn, &ka)?));
                pending.push((kb.clone(), read_row(conn, &kb)?));
            }
        }
        Ok(())
    }

    /// Re-spells a key of `names` (the other case, in one of two ways) or `loose` (1 ↔ 1.0).
    fn respell(
        &mut self,
        t: usize,
        key: Vec<Value>,
        seed: u64,
        pending: &mut Pending,
    ) -> rusqlite::Result<()> {
        let old = (t, key.clone());
        self.check(&old, seed, pending)?;
        let new_key = match &key[0] {
            Value::Text(k) => {
                let flipped: String = k
                    .chars()
                    .map(|c| {
                        if c.is_lowercase() {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect();
                Value::Text(flipped)
            }
            Value::Real(f) => Value::Integer(*f as i64),
            Value::Integer(i) => Value::Real(*i as f64),
            other => other.clone(),
        };
        let table = OWNED[t].0;
        if self.rng.chance(50) {
            self.conn.execute(
                &format!("UPDATE {table} SET k = ?1 WHERE k IS ?2"),
                rusqlite::params![new_key, key[0]],
            )?;
        } else {
            let v: Value = self.conn.query_row(
                &format!("SELECT v FROM {table} WHERE k IS ?1"),
                [&key[0]],
                |r| r.get(0),
            )?;
            self.conn
                .execute(&format!("DELETE FROM {table} WHERE k IS ?1"), [&key[0]])?;
            self.conn.execute(
                &format!("INSERT INTO {table} (k, v) VALUES (?1, ?2)"),
                rusqlite::params![new_key, v],
            )?;
        }
        let new = (t, vec![new_key]);
        self.live[t].retain(|x| *x != key);
        self.live[t].push(new.1.clone());
        pending.push((old, None));
        pending.push((new.clone(), read_row(&self.conn, &new)?));
        Ok(())
    }

    /// `INSERT OR REPLACE` of a new ints row, or `UPDATE OR REPLACE` of another, taking the
    /// UNIQUE value of one of our rows: SQLite deletes that row (without a delete trigger).
    fn replace(&mut self, seed: u64, pending: &mut Pending) -> rusqlite::Result<()> {
        let Some(a) = self.pick(0) else {
            return Ok(());
        };
        let ka = (0, a.clone());
        self.check(&ka, seed, pending)?;
        let u: Value = self
            .conn
            .query_row("SELECT u FROM ints WHERE id = ?1", [&a[0]], |r| r.get(0))?;
        if u == Value::Null {
            return Ok(());
        }
        let target = match self.pick(0) {
            Some(b) if b != a && self.rng.chance(50) => {
                self.check(&(0, b.clone()), seed, pending)?;
                self.conn.execute(
                    "UPDATE OR REPLACE ints SET u = ?1 WHERE id = ?2",
                    rusqlite::params![u, b[0]],
                )?;
                b
            }
            _ => {
                let id = self.fresh_key(0);
                self.check(&(0, id.clone()), seed, pending)?;
                self.conn.execute(
                    "INSERT OR REPLACE INTO ints (id, u, n, v) VALUES (?1, ?2, 1, 'replaced')",
                    rusqlite::params![id[0], u],
                )?;
                self.live[0].push(id.clone());
                id
            }
        };
        self.live[0].retain(|x| *x != a);
        pending.push((ka, None));
        let kt = (0, target);
        pending.push((kt.clone(), read_row(&self.conn, &kt)?));
        Ok(())
    }

    /// A bulk `INSERT … SELECT` of 100–500 rows.
    fn bulk(&mut self, pending: &mut Pending) -> rusqlite::Result<()> {
        let count = 100 + self.rng.below(400) as i64;
        let base = self.fresh_int();
        self.next_id += count + 1;
        self.conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
             INSERT INTO ints (id, u, n, v) SELECT ?1 + i, NULL, i, 'bulk ' || i FROM n",
            rusqlite::params![base, count],
        )?;
        for i in 0..count {
            let key = vec![Value::Integer(base + i)];
            let k = (0, key.clone());
            pending.push((k.clone(), read_row(&self.conn, &k)?));
            self.live[0].push(key);
        }
        Ok(())
    }

    /// One deferred transaction: read, then 1–`max` statements. Returns the error if it failed.
    pub(super) fn transaction(&mut self, seed: u64, max: u64) -> Result<(), String> {
        let live_before = self.live.clone();
        let (next_id, tmp) = (self.next_id, self.tmp);
        let mut pending = Pending::new();
        let result = (|| -> rusqlite::Result<()> {
            self.conn.execute_batch("BEGIN")?;
            // Read first: the deferred transaction holds a snapshot from here on.
            let _: i64 = self
                .conn
                .query_row("SELECT count(*) FROM ints", [], |r| r.get(0))?;
            if self.rng.chance(8) {
                self.bulk(&mut pending)?;
            } else {
                for _ in 0..1 + self.rng.below(max) {
                    self.statement(seed, &mut pending)?;
                }
            }
            self.conn.execute_batch("COMMIT")
        })();
        match result {
            Ok(()) => {
                let mut model = self.model.lock().expect("model");
                for (k, row) in pending {
                    model.set(&k, row);
                }
                drop(model);
                // Now and then the application compacts its file: rowid-keyed rows (`norow`)
                // must keep their identity through it.
                if self.rng.chance(4) {
                    self.conn
                        .execute_batch("VACUUM")
                        .map_err(|e| format!("VACUUM: {e}"))?;
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.live = live_before;
                self.next_id = next_id;
                self.tmp = tmp;
                Err(e.to_string())
            }
        }
    }

    /// Copies this node's database to `path` the way a backup does (SQLite's backup API, live).
    pub(super) fn copy_to(&self, path: &std::path::Path) {
        self.conn
            .backup(rusqlite::MAIN_DB, path, None)
            .expect("backup");
    }

    /// Overwrites this node's database with the copy at `path` (the operator restores a backup
    /// while the daemon is stopped).
    pub(super) fn restore_from(&mut self, path: &std::path::Path) {
        self.conn
            .restore(
                rusqlite::MAIN_DB,
                path,
                None::<fn(rusqlite::backup::Progress)>,
            )
            .expect("restore");
    }

    /// An auto-id insert into `people`; in phase 2 every node does it at once, so two nodes
    /// take the same id and one row loses (it must be found in `__harmonylite__conflicts`).
    pub(super) fn person(&mut self) {
        let email = format!("w{}-p{}", self.w, self.rng.next() % 1_000_000_000);
        if self
            .conn
            .execute("INSERT INTO people (email) VALUES (?1)", [&email])
            .is_ok()
        {
            self.emails.push(email);
        }
    }

    /// A write to the shared table (rows every node writes).
    pub(super) fn shared(&mut self) -> Result<(), String> {
        let id = self.rng.below(30) as i64;
        let v = format!("w{} {}", self.w, self.rng.next());
        let sql = match self.rng.below(4) {
            0 => "DELETE FROM shared WHERE id = ?1",
            _ => {
                "INSERT INTO shared (id, v, n) VALUES (?1, ?2, 1) ON CONFLICT (id) DO UPDATE SET v = excluded.v, n = n + 1"
            }
        };
        let r = if sql.starts_with("DELETE") {
            self.conn.execute(sql, [id])
        } else {
            self.conn.execute(sql, rusqlite::params![id, v])
        };
        r.map(|_| ()).map_err(|e| e.to_string())
    }
}
