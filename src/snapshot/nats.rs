//! The `nats` snapshot store: JetStream object store `snapshot.nats.bucket` (default
//! `<stream_prefix>-snapshot-store`), object `snapshot.db` with Go's `harmonylite-snapshot-tag`
//! header, our [`Meta`] as object metadata key [`META_KEY`] (Go ignores it).
//!
//! A put writes the new chunks under a fresh id, then replaces the object's info: the previous
//! snapshot stays readable until the new one is complete. Uploads read chunks from the file as
//! sent, downloads fetch about 8 MB at a time: memory does not grow with the snapshot.
//!
//! The put is ours, not the client library's, which awaits each chunk's ack before the next (most
//! of a save's time); ours keeps [`ACKS_IN_FLIGHT`] chunks unacknowledged and removes a failed
//! put's chunks. Same subjects, info record and digest: Go and the library read it.

use std::path::Path;

use async_nats::jetstream::{self, object_store};
use futures::future::BoxFuture;

use super::store::{Error, Meta, OBJECT, Progress, ProgressReader, Store, TAG_HEADER};

const KIND: &str = "nats";
/// Object metadata key holding our [`Meta`] as JSON.
pub const META_KEY: &str = "harmonylite-meta";
/// Bytes asked for at once while downloading (whole chunks, at least one).
const FETCH_BYTES: usize = 8 << 20;

/// Upload chunk size: half the server's `max_payload` (so a chunk always fits), at most 1 MiB.
fn chunk_size(max_payload: usize) -> usize {
    (max_payload / 2).clamp(4 << 10, 1 << 20)
}
/// Chunks sent ahead of their acks while uploading (memory: this many chunks at most).
const ACKS_IN_FLIGHT: usize = 16;
/// How long a download waits for the next chunks before it fails.
const CHUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct NatsStore {
    js: jetstream::Context,
    bucket: String,
    replicas: usize,
}

impl NatsStore {
    /// Writes the chunks of `info` to `out` (module header; the library's push consumer buffered
    /// tens of MB); a lost chunk (a gap in the consumer's sequence) or a size mismatch fails.
    async fn read_chunks(
        &self,
        info: &object_store::ObjectInfo,
        out: &mut tokio::fs::File,
    ) -> Result<(), Error> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let fail = |e: &dyn std::fmt::Display| self.failed("download", e);
        let mut messages = self.chunk_messages(info).await?;
        let mut progress = Progress::new(KIND, "Downloading", Some(info.size as u64));
        let (mut got, mut bytes) = (0usize, 0u64);
        while got < info.chunks {
            let n = info.chunks;
            let msg = match tokio::time::timeout(CHUNK_WAIT, messages.next()).await {
                Err(_) => {
                    let why = format!("no chunk arrived within {CHUNK_WAIT:?} ({got} of {n} read)");
                    return Err(fail(&why));
                }
                Ok(None) => return Err(fail(&format!("the chunks ended after {got} of {n}"))),
                Ok(Some(msg)) => msg.map_err(|e| fail(&e))?,
            };
            let seq = msg.info().map_err(|e| fail(&e))?.consumer_sequence;
            if seq != got as u64 + 1 {
                let next = got + 1;
                let why = format!("chunk {next} of {n} arrived as number {seq}: a chunk was lost");
                return Err(fail(&why));
            }
            out.write_all(&msg.payload).await.map_err(|e| fail(&e))?;
            got += 1;
            bytes += msg.payload.len() as u64;
            progress.add(msg.payload.len());
        }
        if bytes != info.size as u64 {
            let want = info.size;
            return Err(fail(&format!(
                "read {bytes} bytes, the object's info says {want}"
            )));
        }
        out.flush().await.map_err(|e| fail(&e))
    }

    /// The chunks of `info` from an ephemeral pull consumer, pipelined: ~two batches in flight.
    async fn chunk_messages(
        &self,
        info: &object_store::ObjectInfo,
    ) -> Result<jetstream::consumer::pull::Stream, Error> {
        let fail = |e: &dyn std::fmt::Display| self.failed("download", e);
        let stream = self
            .js
            .get_stream(format!("OBJ_{}", self.bucket))
            .await
            .map_err(|e| fail(&e))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: format!("$O.{}.C.{}", self.bucket, info.nuid),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: std::time::Duration::from_secs(60),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        let per_chunk = info.size.div_ceil(info.chunks.max(1)).max(1);
        consumer
            .stream()
            .max_messages_per_batch((FETCH_BYTES / per_chunk).max(1))
            .expires(CHUNK_WAIT)
            .messages()
            .await
            .map_err(|e| fail(&e))
    }

    /// Puts `data` as object [`OBJECT`] with our `meta`, filling in size and checksums while
    /// sending; the old object's chunks are purged once the new info is in place (module header).
    async fn put(
        &self,
        bucket: &object_store::ObjectStore,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
        meta: Meta,
    ) -> Result<(object_store::ObjectInfo, Meta), Error> {
        let previous = bucket.info(OBJECT).await.ok();
        let nuid = uuid::Uuid::new_v4().simple().to_string();
        let chunks = format!("$O.{}.C.{nuid}", self.bucket);
        let sent = self.put_chunks(&chunks, data, meta, &nuid).await;
        let stream = format!("OBJ_{}", self.bucket);
        let purge = |subject: String| async move {
            let fail = |e: &(dyn std::error::Error + 'static)| {
                let why = format!("purging chunks: {}", crate::error_chain(e));
                self.failed("upload", &why)
            };
            let s = self.js.get_stream(&stream).await.map_err(|e| fail(&e))?;
            s.purge()
                .filter(subject)
                .await
                .map(|_| ())
                .map_err(|e| fail(&e))
        };
        let (info, meta) = match sent {
            Ok(done) => done,
            Err(e) => {
                if let Err(p) = purge(chunks).await {
                    tracing::warn!(bucket = %self.bucket, error = %p, "Cannot remove the chunks of a failed snapshot upload");
                }
                return Err(e);
            }
        };
        if let Some(old) = previous.filter(|o| o.nuid != info.nuid && !o.nuid.is_empty()) {
            purge(format!("$O.{}.C.{}", self.bucket, old.nuid)).await?;
        }
        Ok((info, meta))
    }

    /// Sends the chunks to `subject` with up to [`ACKS_IN_FLIGHT`] unacknowledged, then the info
    /// record (a rollup of the object's info subject) with `meta` completed.
    async fn put_chunks(
        &self,
        subject: &str,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
        mut meta: Meta,
        nuid: &str,
    ) -> Result<(object_store::ObjectInfo, Meta), Error> {
        let chunk = chunk_size(self.js.client().server_info().max_payload);
        // One SHA-256 for the object store's digest (base64) and ours (hex), plus Go's tag.
        let mut ours = super::Digester::new(meta.fnv_tag.is_none());
        let count = self.send_chunks(subject, data, chunk, &mut ours).await?;
        let (size, digest, fnv) = tokio::task::spawn_blocking(move || ours.finish())
            .await
            .map_err(|e| self.failed("upload", &format!("checksum task failed: {e}")))?;
        let sha256 = crate::hex(&digest);
        // What the caller gave is stored as given (a test stores a corrupted copy that way).
        meta.size.get_or_insert(size);
        meta.sha256.get_or_insert(sha256);
        meta.fnv_tag.get_or_insert(fnv);
        let info = self.object_info(&meta, nuid, chunk, count, size, &digest);
        self.put_info(&info).await?;
        Ok((info, meta))
    }

    /// Sends `data` to `subject` in chunks of `chunk` bytes, feeding `ours`, with up to
    /// [`ACKS_IN_FLIGHT`] unacknowledged; returns how many chunks were sent, all acknowledged.
    async fn send_chunks(
        &self,
        subject: &str,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
        chunk: usize,
        ours: &mut super::Digester,
    ) -> Result<usize, Error> {
        use tokio::io::AsyncReadExt as _;
        let unacked = |n, e| self.failed("upload", &format!("chunk {n} not acknowledged: {e}"));
        let mut acks = std::collections::VecDeque::new();
        let mut count = 0usize;
        loop {
            let mut buf = bytes::BytesMut::with_capacity(chunk);
            while buf.len() < chunk {
                if data
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| self.failed("upload", &e))?
                    == 0
                {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            let payload = buf.freeze();
            ours.update(payload.clone());
            count += 1;
            let ack = self
                .js
                .publish(subject.to_owned(), payload)
                .await
                .map_err(|e| self.failed("upload", &format!("sending chunk {count}: {e}")))?;
            acks.push_back((count, ack));
            if acks.len() >= ACKS_IN_FLIGHT
                && let Some((n, ack)) = acks.pop_front()
            {
                ack.await.map_err(|e| unacked(n, e))?;
            }
        }
        for (n, ack) in acks {
            ack.await.map_err(|e| unacked(n, e))?;
        }
        Ok(count)
    }

    /// The info record of an object whose `count` chunks of at most `chunk` bytes are sent.
    fn object_info(
        &self,
        meta: &Meta,
        nuid: &str,
        chunk: usize,
        count: usize,
        size: u64,
        digest: &[u8; 32],
    ) -> object_store::ObjectInfo {
        use base64::Engine as _;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(tag) = &meta.fnv_tag {
            headers.insert(TAG_HEADER, tag.as_str());
        }
        let modified = Some(crate::clock::now());
        object_store::ObjectInfo {
            name: OBJECT.to_owned(),
            description: None,
            metadata: [(META_KEY.to_owned(), meta.to_json())]
                .into_iter()
                .collect(),
            headers: Some(headers),
            options: Some(object_store::ObjectOptions {
                max_chunk_size: Some(chunk),
                link: None,
            }),
            bucket: self.bucket.clone(),
            nuid: nuid.to_owned(),
            size: size as usize,
            chunks: count,
            modified,
            digest: Some(format!(
                "SHA-256={}",
                base64::engine::general_purpose::URL_SAFE.encode(digest)
            )),
            deleted: false,
        }
    }

    /// Publishes `info` as a rollup of the object's info subject, replacing the previous one.
    async fn put_info(&self, info: &object_store::ObjectInfo) -> Result<(), Error> {
        use base64::Engine as _;
        let body = serde_json::to_vec(info).map_err(|e| self.failed("upload", &e))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        let name = base64::engine::general_purpose::URL_SAFE.encode(&info.name);
        self.js
            .publish_with_headers(format!("$O.{}.M.{name}", self.bucket), headers, body.into())
            .await
            .map_err(|e| self.failed("upload", &format!("sending the object info: {e}")))?
            .await
            .map_err(|e| self.failed("upload", &format!("object info not acknowledged: {e}")))?;
        Ok(())
    }

    /// Uploads `file` with `meta` (what it lacks of size and checksums is computed on the way).
    async fn send(&self, file: &Path, meta: Meta) -> Result<Meta, Error> {
        let bucket = self.bucket("upload").await?;
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| Error::new(KIND, "upload", &self.object(), &e))?;
        let total = f.metadata().await.ok().map(|m| m.len());
        let mut f = ProgressReader::new(f, Progress::new(KIND, "Uploading", total));
        let (put, meta) = self.put(&bucket, &mut f, meta).await?;
        tracing::info!(
            file_name = OBJECT,
            size = put.size,
            chunks = put.chunks,
            hash = meta.fnv_tag.as_deref().unwrap_or(""),
            "Snapshot saved to NATS"
        );
        Ok(meta)
    }

    pub fn new(js: jetstream::Context, bucket: String, replicas: i64) -> NatsStore {
        NatsStore {
            js,
            bucket,
            replicas: replicas.max(1) as usize,
        }
    }

    /// The bucket, created when missing (Go's settings).
    async fn bucket(&self, op: &'static str) -> Result<object_store::ObjectStore, Error> {
        if let Ok(b) = self.js.get_object_store(&self.bucket).await {
            return Ok(b);
        }
        let config = object_store::Config {
            bucket: self.bucket.clone(),
            description: Some("Bucket to store snapshot".to_owned()),
            num_replicas: self.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        match self.js.create_object_store(config).await {
            Ok(b) => Ok(b),
            // Another node may have created it meanwhile.
            Err(e) => self
                .js
                .get_object_store(&self.bucket)
                .await
                .map_err(|_| Error::new(KIND, op, &self.object(), &e)),
        }
    }

    fn failed(&self, op: &'static str, message: &dyn std::fmt::Display) -> Error {
        Error::msg(KIND, op, &self.object(), message.to_string())
    }

    fn object(&self) -> String {
        format!("{}/{OBJECT}", self.bucket)
    }

    fn meta_of(info: &object_store::ObjectInfo) -> Meta {
        let mut meta = info
            .metadata
            .get(META_KEY)
            .and_then(|m| Meta::from_json(m.as_bytes()))
            .unwrap_or_default();
        meta.fnv_tag = info
            .headers
            .as_ref()
            .and_then(|h| h.get(TAG_HEADER))
            .map(|v| v.as_str().to_owned());
        meta
    }
}

impl Store for NatsStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn upload<'a>(&'a self, file: &'a Path, meta: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { self.send(file, meta.clone()).await.map(|_| ()) })
    }

    fn upload_filling<'a>(
        &'a self,
        file: &'a Path,
        meta: Meta,
    ) -> BoxFuture<'a, Result<Meta, Error>> {
        Box::pin(self.send(
            file,
            Meta {
                size: None,
                sha256: None,
                fnv_tag: None,
                ..meta
            },
        ))
    }

    fn download<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            let object = self.object();
            let fail =
                |e: &(dyn std::error::Error + 'static)| Error::new(KIND, "download", &object, e);
            let said = |m: String| Error::msg(KIND, "download", &object, m);
            let bucket = self.bucket("download").await?;
            let info = match bucket.info(OBJECT).await {
                Ok(info) if !info.deleted => info,
                Ok(_) => return Ok(None),
                Err(e) if matches!(e.kind(), object_store::InfoErrorKind::NotFound) => {
                    return Ok(None);
                }
                Err(e) => return Err(fail(&e)),
            };
            if info.options.as_ref().is_some_and(|o| o.link.is_some()) {
                return Err(said(
                    "the object is a link; harmonylite never writes links".into(),
                ));
            }
            let meta = NatsStore::meta_of(&info);
            let mut out = tokio::fs::File::create(dest).await.map_err(|e| fail(&e))?;
            self.read_chunks(&info, &mut out).await?;
            Ok(Some(meta))
        })
    }

    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            let bucket = self.bucket("read metadata of").await?;
            match bucket.info(OBJECT).await {
                Ok(info) => Ok(Some(NatsStore::meta_of(&info))),
                Err(e) if matches!(e.kind(), object_store::InfoErrorKind::NotFound) => Ok(None),
                Err(e) => Err(Error::new(KIND, "read metadata of", &self.object(), &e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_size;

    #[test]
    fn chunks_fit_the_server_and_stay_bounded() {
        assert_eq!(chunk_size(1 << 20), 512 << 10);
        assert_eq!(chunk_size(8 << 20), 1 << 20);
        assert_eq!(chunk_size(64 << 10), 32 << 10);
    }
}
