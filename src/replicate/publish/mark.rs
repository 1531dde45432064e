//! The sent mark: how far this database has handed changes to NATS (file `<db>-harmonylite.sent`),
//! written (then renamed into place) before the sends it covers, never going back, and belonging to
//! one database identity; a mark that cannot be read counts as none.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::db;

/// The sent mark: the database identity and the highest global change id of any send. After a crash
/// a pending change above it was never sent (certainly in flight); only those at or below it that
/// the streams no longer show have an unknown fate ([`crate::db::restore::NotKept`]). Outside the
/// database on purpose: every commit of ours can fail an application's deferred transaction.
pub struct SentMark {
    path: std::path::PathBuf,
    identity: String,
    written: AtomicI64,
    warned: std::sync::atomic::AtomicBool,
}

impl SentMark {
    /// `floor`: the highest global id that may have been sent before ([`SentMark::read`]'s answer,
    /// or what existed at start without a mark); the mark never goes below it (a crash after
    /// sending older pending changes must not hide that newer ones went out earlier). Without a
    /// mark of this database the floor is written at once: a later start knows changes captured
    /// after it were never sent (else a node stopped before its first send took changes made while
    /// down for "maybe sent", and a restore let the snapshot's older rows replace them).
    pub fn new(db_path: &std::path::Path, identity: &str, floor: i64) -> SentMark {
        let mark = SentMark {
            path: db::sent_mark_path(db_path),
            identity: identity.to_owned(),
            written: AtomicI64::new(floor),
            warned: std::sync::atomic::AtomicBool::new(false),
        };
        if Self::read(db_path, identity).is_none() {
            mark.write(floor);
        }
        mark
    }

    /// The highest global id recorded so far by this run.
    pub(super) fn written(&self) -> i64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records that changes up to global id `last` are about to be sent.
    pub(super) fn advance(&self, last: i64) {
        if last > self.written.load(Ordering::Relaxed) {
            self.write(last);
        }
    }

    fn write(&self, last: i64) {
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let written = std::fs::write(&tmp, format!("{} {last}\n", self.identity))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => self.written.store(last, Ordering::Relaxed),
            Err(e) => {
                // Without it a crash only widens the set of changes of unknown fate.
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), error = %e, "Cannot record how far changes were sent");
                }
            }
        }
    }

    /// The highest global id the previous run of this database recorded as sent (if readable).
    pub fn read(db_path: &std::path::Path, identity: &str) -> Option<i64> {
        let text = std::fs::read_to_string(db::sent_mark_path(db_path)).ok()?;
        let (who, last) = text.trim().split_once(' ')?;
        (who == identity).then(|| last.parse().ok()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::SentMark;

    #[test]
    fn sent_mark_round_trips_and_belongs_to_one_database() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("app.db");
        assert_eq!(SentMark::read(&db, "abc"), None, "no mark yet");
        let mark = SentMark::new(&db, "abc", 10);
        assert_eq!(SentMark::read(&db, "abc"), Some(10), "the floor, at once");
        mark.advance(9);
        assert_eq!(
            SentMark::read(&db, "abc"),
            Some(10),
            "never below the floor"
        );
        mark.advance(41);
        mark.advance(7); // never goes back
        assert_eq!(SentMark::read(&db, "abc"), Some(41));
        assert_eq!(
            SentMark::read(&db, "other"),
            None,
            "another identity's mark"
        );
        std::fs::write(crate::db::sent_mark_path(&db), "abc garbage").expect("write");
        assert_eq!(SentMark::read(&db, "abc"), None, "unreadable: unknown");
    }
}
