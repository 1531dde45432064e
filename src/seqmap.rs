//! The sequence map: `{stream name: last applied stream sequence}` as one CBOR map in a file,
//! byte-compatible with Go HarmonyLite's `seq-map.cbor` (upstream-behaviour §7). Invariants
//! (design.md §3.3): only what this node has *applied* is recorded (publishing never advances it);
//! values only grow ([`SeqMap::advance`]) but for a recreated stream or a restore
//! ([`SeqMap::reset_all`]). Saves are atomic (temp file, fsync, rename, directory fsync): a crash
//! leaves the old or the new map. Loading is tolerant: only the first CBOR item is read (Go rewrote
//! the file in place, possibly leaving a stale tail); an unreadable file is reported and treated as
//! empty, replaying the retained stream (idempotent) rather than refusing to start.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cbor::{self, Item};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read sequence map {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write sequence map {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file holds something else; [`SeqMap::open_tolerant`] starts from an empty map instead.
    #[error("sequence map {path} is not a CBOR map of stream name to sequence")]
    Corrupt {
        path: PathBuf,
        #[source]
        why: Malformed,
    },
}

/// Why the file's first item is not a sequence map.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// Not CBOR at all (or cut short).
    #[error(transparent)]
    Cbor(#[from] cbor::Error),
    #[error("first item is not a map")]
    NotAMap,
    #[error("entry is not text → unsigned integer")]
    BadEntry,
}

/// The in-memory map and the file it is saved to.
#[derive(Debug)]
pub struct SeqMap {
    path: PathBuf,
    map: BTreeMap<String, u64>,
}

impl SeqMap {
    /// Loads the map at `path`; a missing or empty file is an empty map. [`Error::Corrupt`] when
    /// its first item is not a map of text to unsigned integers (see [`SeqMap::open_tolerant`]).
    pub fn open(path: &Path) -> Result<SeqMap, Error> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let map = if bytes.is_empty() {
            BTreeMap::new()
        } else {
            parse(&bytes).map_err(|why| Error::Corrupt {
                path: path.to_owned(),
                why,
            })?
        };
        Ok(SeqMap {
            path: path.to_owned(),
            map,
        })
    }

    /// Like [`SeqMap::open`], but a corrupt file is logged and treated as empty (module header).
    pub fn open_tolerant(path: &Path) -> Result<SeqMap, Error> {
        match SeqMap::open(path) {
            Err(Error::Corrupt { path, why }) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %why,
                    "Sequence map is corrupt; starting from an empty map (the streams will be replayed)"
                );
                Ok(SeqMap {
                    path,
                    map: BTreeMap::new(),
                })
            }
            other => other,
        }
    }

    /// The last applied sequence of `stream`, 0 when none.
    pub fn get(&self, stream: &str) -> u64 {
        self.map.get(stream).copied().unwrap_or(0)
    }

    pub fn entries(&self) -> BTreeMap<String, u64> {
        self.map.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets `stream`'s sequence to `seq` even if lower (the stream was recreated), and saves.
    pub fn reset(&mut self, stream: &str, seq: u64) -> Result<(), Error> {
        self.reset_all([(stream, seq)])
    }

    /// Sets every given stream's sequence (even if lower) in one atomic save: after a restore all
    /// positions move together (two saves and a crash between would mix snapshot and older
    /// positions). On [`Error::Write`] the map in memory is updated anyway.
    pub fn reset_all<'a>(
        &mut self,
        updates: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), Error> {
        for (stream, seq) in updates {
            self.map.insert(stream.to_owned(), seq);
        }
        self.save(&self.map)
    }

    /// Raises recorded sequences to the given ones (lower ones ignored), saving atomically if any
    /// changed; whether it wrote. On [`Error::Write`] memory is unchanged: the next save retries.
    pub fn advance<'a>(
        &mut self,
        updates: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<bool, Error> {
        let mut next = self.map.clone();
        let mut changed = false;
        for (stream, seq) in updates {
            let slot = next.entry(stream.to_owned()).or_insert(0);
            if seq > *slot {
                *slot = seq;
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        self.save(&next)?;
        self.map = next;
        Ok(true)
    }

    fn save(&self, map: &BTreeMap<String, u64>) -> Result<(), Error> {
        write_atomic(&self.path, &encode(map)).map_err(|source| Error::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Encodes a map as Go does (definite map, text keys, shortest unsigned heads).
pub fn encode(map: &BTreeMap<String, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + map.len() * 32);
    cbor::put_head(&mut out, 5, map.len() as u64);
    for (k, v) in map {
        cbor::put_text(&mut out, k.as_bytes());
        cbor::put_head(&mut out, 0, *v);
    }
    out
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<String, u64>, Malformed> {
    let (item, _) = cbor::decode_first(bytes)?;
    let Item::Map(pairs) = item else {
        return Err(Malformed::NotAMap);
    };
    pairs
        .into_iter()
        .map(|(k, v)| match (k.as_str(), v) {
            (Some(k), Item::Unsigned(seq)) => Ok((k.to_owned(), seq)),
            _ => Err(Malformed::BadEntry),
        })
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// upstream-behaviour §7: `{"harmonylite-changes-c-1":42}`.
    const GOLDEN: [u8; 26] = [
        0xa1, 0x77, b'h', b'a', b'r', b'm', b'o', b'n', b'y', b'l', b'i', b't', b'e', b'-', b'c',
        b'h', b'a', b'n', b'g', b'e', b's', b'-', b'c', b'-', b'1', 0x18,
    ];

    fn golden_bytes() -> Vec<u8> {
        let mut v = GOLDEN.to_vec();
        v.push(0x2a);
        v
    }

    #[test]
    fn golden_encoding() {
        let map = BTreeMap::from([("harmonylite-changes-c-1".to_owned(), 42)]);
        assert_eq!(encode(&map), golden_bytes());
    }

    #[test]
    fn reads_go_file_with_stale_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seq-map.cbor");
        let mut bytes = golden_bytes();
        bytes.extend_from_slice(&[0x18, 0x2a, 0x00, 0xff]);
        fs::write(&path, bytes).expect("write");
        let m = SeqMap::open(&path).expect("opens");
        assert_eq!(m.get("harmonylite-changes-c-1"), 42);
        assert_eq!(m.get("other"), 0);
    }

    #[test]
    fn empty_and_missing_files_are_empty_maps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seq-map.cbor");
        assert!(SeqMap::open(&path).expect("missing").entries().is_empty());
        fs::write(&path, b"").expect("write");
        assert!(SeqMap::open(&path).expect("empty").entries().is_empty());
    }

    #[test]
    fn garbage_is_corrupt_but_tolerated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seq-map.cbor");
        fs::write(&path, b"not cbor data").expect("write");
        assert!(matches!(SeqMap::open(&path), Err(Error::Corrupt { .. })));
        fs::write(&path, [0x1c]).expect("write");
        let e = SeqMap::open(&path).expect_err("corrupt");
        // Log lines print the chain, which reads as the one message did before.
        assert_eq!(
            crate::error_chain(&e),
            format!(
                "sequence map {} is not a CBOR map of stream name to sequence: \
                 malformed CBOR at byte 1: reserved additional information",
                path.display()
            )
        );
        fs::write(&path, [0x01]).expect("write");
        assert!(matches!(
            SeqMap::open(&path),
            Err(Error::Corrupt {
                why: Malformed::NotAMap,
                ..
            })
        ));
        fs::write(&path, b"not cbor data").expect("write");
        let mut m = SeqMap::open_tolerant(&path).expect("tolerant");
        assert!(m.entries().is_empty());
        assert!(m.advance([("s", 3)]).expect("saves"));
        assert_eq!(SeqMap::open(&path).expect("reopens").get("s"), 3);
    }

    #[test]
    fn advance_is_monotonic_and_persists_every_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seq-map.cbor");
        let mut m = SeqMap::open(&path).expect("opens");
        assert!(m.advance([("a", 10), ("b", 5)]).expect("saves"));
        assert!(!m.advance([("a", 9)]).expect("no-op"));
        assert!(!m.advance([("a", 10)]).expect("no-op"));
        assert!(m.advance([("b", 6), ("a", 1)]).expect("saves"));
        let reloaded = SeqMap::open(&path).expect("reopens");
        assert_eq!(reloaded.get("a"), 10);
        assert_eq!(reloaded.get("b"), 6);
        assert!(!dir.path().join("seq-map.cbor.tmp").exists());
    }

    #[test]
    fn reset_all_moves_every_stream_even_down_and_persists_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seq-map.cbor");
        let mut m = SeqMap::open(&path).expect("opens");
        m.advance([("a", 10), ("b", 5), ("c", 7)]).expect("saves");
        m.reset_all([("a", 3), ("b", 8)]).expect("saves");
        let reloaded = SeqMap::open(&path).expect("reopens");
        assert_eq!(
            reloaded.entries(),
            [
                ("a".to_owned(), 3),
                ("b".to_owned(), 8),
                ("c".to_owned(), 7)
            ]
            .into()
        );
    }

    #[test]
    fn failed_write_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("seq-map.cbor");
        let mut m = SeqMap::open(&path).expect("opens");
        assert!(matches!(m.advance([("a", 1)]), Err(Error::Write { .. })));
        assert_eq!(m.get("a"), 0);
    }
}
