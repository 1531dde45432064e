//! Where snapshots live: one small trait ([`Store`]) and one implementation per backend
//! (`nats`, `s3`, `webdav`, `sftp`), all exercised by one conformance suite in the tests.
//!
//! A store holds one snapshot: the object [`OBJECT`] (Go HarmonyLite's name, so Go nodes restore
//! ours and we restore theirs) plus its [`Meta`], as object metadata or else as a sidecar object
//! [`SIDECAR`] written after the data. S3 binds the sidecar to the object's ETag; WebDAV and SFTP
//! believe it when its size is the object's ([`trusted`]), so new data of the same size beside an
//! old sidecar (a Go node's upload) is refused on its checksum until one of ours replaces both.
//!
//! Invariants:
//! - An upload never destroys the previous snapshot before the new one is complete (unlike Go,
//!   which deletes first): each backend writes a new object and replaces the old in one step.
//! - Transfers stream: memory use does not depend on the database size.
//! - Every error names the store and the object; none of them stops replication.

use std::collections::BTreeMap;
use std::path::Path;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// The snapshot object's name (Go's).
pub const OBJECT: &str = "snapshot.db";
/// The metadata sidecar of stores without object metadata.
pub const SIDECAR: &str = "snapshot.db.meta.json";
/// Go's object header with the FNV-1 64 hash of the file (lower-case hex, no padding).
pub const TAG_HEADER: &str = "harmonylite-snapshot-tag";

/// What we record about a snapshot. Every field is optional: a snapshot made by Go HarmonyLite
/// has none of them (only, on NATS, the FNV tag).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Hex SHA-256 of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Stream name → last sequence whose effect the snapshot contains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<BTreeMap<String, u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// Unix milliseconds when the copy was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<i64>,
    /// Go's FNV-1 64 tag, when the store had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fnv_tag: Option<String>,
}

impl Meta {
    /// As JSON (object metadata value or sidecar content).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Parses [`Meta::to_json`]'s output; `None` for anything else.
    pub fn from_json(text: &[u8]) -> Option<Meta> {
        serde_json::from_slice(text).ok()
    }
}

/// The sidecar's meta if it describes an object of `size` bytes; else none (Go's, or stale).
pub(super) fn trusted(sidecar: Option<Meta>, size: Option<u64>) -> Meta {
    match (sidecar, size) {
        (Some(m), Some(size)) if m.size == Some(size) => m,
        _ => Meta::default(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot store {store}: cannot {op} {object}: {message}")]
pub struct Error {
    pub store: &'static str,
    pub op: &'static str,
    pub object: String,
    pub message: String,
    /// Retrying cannot help (bad credentials, a bad URL): the operator must fix the config.
    pub config: bool,
}

impl Error {
    /// An error with its whole cause chain.
    pub fn new(
        store: &'static str,
        op: &'static str,
        object: &str,
        e: &(dyn std::error::Error + 'static),
    ) -> Error {
        Error::msg(store, op, object, crate::error_chain(e))
    }

    pub fn msg(store: &'static str, op: &'static str, object: &str, message: String) -> Error {
        Error {
            store,
            op,
            object: object.to_owned(),
            message,
            config: false,
        }
    }

    pub fn config(mut self) -> Error {
        self.config = true;
        self
    }

    /// Whether the configuration is at fault (not the network or the server).
    pub fn is_config(&self) -> bool {
        self.config
    }
}

pub trait Store: Send + Sync {
    /// The backend's name (`nats`, `s3`, …) for logs and errors.
    fn kind(&self) -> &'static str;

    /// Uploads `file` as the snapshot, with `meta`, replacing the previous one only once complete.
    fn upload<'a>(&'a self, file: &'a Path, meta: &'a Meta) -> BoxFuture<'a, Result<(), Error>>;

    /// [`Store::upload`] with `meta`'s `size`, `sha256` and `fnv_tag` computed from `file`;
    /// returns the metadata stored. By default they are computed first; a store that writes its
    /// metadata after the data computes them while sending (one read of the file, not two).
    fn upload_filling<'a>(
        &'a self,
        file: &'a Path,
        meta: Meta,
    ) -> BoxFuture<'a, Result<Meta, Error>> {
        Box::pin(async move {
            let path = file.to_path_buf();
            let fail = |m: String| Error::msg(self.kind(), "upload", OBJECT, m);
            let (size, sha256, fnv) = tokio::task::spawn_blocking(move || super::digest(&path))
                .await
                .map_err(|e| fail(format!("checksum task failed: {e}")))?
                .map_err(|e| fail(crate::error_chain(&e)))?;
            let meta = Meta {
                size: Some(size),
                sha256: Some(sha256),
                fnv_tag: Some(fnv),
                ..meta
            };
            self.upload(file, &meta).await?;
            Ok(meta)
        })
    }

    /// Downloads the snapshot into `dest`; `None` when the store holds none.
    fn download<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<Option<Meta>, Error>>;

    /// The snapshot's metadata without its data; `None` when the store holds none.
    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>>;
}

/// Logs the progress of a transfer of more than a few MB, at most every few seconds.
pub struct Progress {
    kind: &'static str,
    what: &'static str,
    total: Option<u64>,
    done: u64,
    last: std::time::Instant,
}

impl Progress {
    /// Bytes below which nothing is logged.
    const QUIET_BELOW: u64 = 8 * 1024 * 1024;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(kind: &'static str, what: &'static str, total: Option<u64>) -> Progress {
        Progress {
            kind,
            what,
            total,
            done: 0,
            last: std::time::Instant::now(),
        }
    }

    pub fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.done >= Self::QUIET_BELOW && self.last.elapsed() >= Self::EVERY {
            self.last = std::time::Instant::now();
            tracing::info!(
                store = self.kind,
                bytes = self.done,
                total = self.total,
                "{} snapshot",
                self.what
            );
        }
    }
}

/// An [`tokio::io::AsyncRead`] that reports what passes through it to a [`Progress`].
pub struct ProgressReader<R> {
    inner: R,
    progress: Progress,
}

impl<R> ProgressReader<R> {
    pub fn new(inner: R, progress: Progress) -> ProgressReader<R> {
        ProgressReader { inner, progress }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ProgressReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.progress.add(read);
        }
        polled
    }
}
