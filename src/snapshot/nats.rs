//! The `nats` snapshot store: JetStream object store `snapshot.nats.bucket` (default
//! `<stream_prefix>-snapshot-store`), object `snapshot.db` with Go's `harmonylite-snapshot-tag`
//! header, our [`Meta`] as object metadata key [`META_KEY`] (Go ignores it).
//!
//! An object-store put writes the new chunks under a fresh id and only then replaces the object's
//! info, so the previous snapshot stays readable until the new one is complete. Chunks are 128 KiB
//! and read from the file as they are sent: memory does not grow with the snapshot.

use std::path::Path;

use async_nats::jetstream::{self, object_store};
use futures::future::BoxFuture;

use super::store::{Error, Meta, OBJECT, Progress, ProgressReader, Store, TAG_HEADER};

const KIND: &str = "nats";
/// Object metadata key holding our [`Meta`] as JSON.
pub const META_KEY: &str = "harmonylite-meta";

/// The NATS object store backend.
pub struct NatsStore {
    js: jetstream::Context,
    bucket: String,
    replicas: usize,
}

impl NatsStore {
    pub fn new(js: jetstream::Context, bucket: String, replicas: i64) -> NatsStore {
        NatsStore {
            js,
            bucket,
            replicas: replicas.max(1) as usize,
        }
    }

    /// The bucket, created when missing (Go's settings).
    async fn bucket(&self, op: &'static str) -> Result<object_store::ObjectStore, Error> {
        match self.js.get_object_store(&self.bucket).await {
            Ok(b) => Ok(b),
            Err(_) => match self
                .js
                .create_object_store(object_store::Config {
                    bucket: self.bucket.clone(),
                    description: Some("Bucket to store snapshot".to_owned()),
                    num_replicas: self.replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
            {
                Ok(b) => Ok(b),
                // Another node may have created it meanwhile.
                Err(e) => self
                    .js
                    .get_object_store(&self.bucket)
                    .await
                    .map_err(|_| Error::new(KIND, op, &self.object(), &e)),
            },
        }
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
        Box::pin(async move {
            let bucket = self.bucket("upload").await?;
            let f = tokio::fs::File::open(file)
                .await
                .map_err(|e| Error::new(KIND, "upload", &self.object(), &e))?;
            let total = f.metadata().await.ok().map(|m| m.len());
            let mut f = ProgressReader::new(f, Progress::new(KIND, "Uploading", total));
            let mut headers = async_nats::HeaderMap::new();
            if let Some(tag) = &meta.fnv_tag {
                headers.insert(TAG_HEADER, tag.as_str());
            }
            let info = object_store::ObjectMetadata {
                name: OBJECT.to_owned(),
                metadata: [(META_KEY.to_owned(), meta.to_json())]
                    .into_iter()
                    .collect(),
                headers: Some(headers),
                ..Default::default()
            };
            let put = bucket
                .put(info, &mut f)
                .await
                .map_err(|e| Error::new(KIND, "upload", &self.object(), &e))?;
            tracing::info!(
                file_name = OBJECT,
                size = put.size,
                chunks = put.chunks,
                hash = meta.fnv_tag.as_deref().unwrap_or(""),
                "Snapshot saved to NATS"
            );
            Ok(())
        })
    }

    fn download<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            let bucket = self.bucket("download").await?;
            let object = match bucket.get(OBJECT).await {
                Ok(o) => o,
                Err(e) if matches!(e.kind(), object_store::GetErrorKind::NotFound) => {
                    return Ok(None);
                }
                Err(e) => return Err(Error::new(KIND, "download", &self.object(), &e)),
            };
            let meta = NatsStore::meta_of(&object.info);
            let total = Some(object.info.size as u64);
            let mut object = ProgressReader::new(object, Progress::new(KIND, "Downloading", total));
            let mut out = tokio::fs::File::create(dest)
                .await
                .map_err(|e| Error::new(KIND, "download", &self.object(), &e))?;
            tokio::io::copy(&mut object, &mut out)
                .await
                .map_err(|e| Error::new(KIND, "download", &self.object(), &e))?;
            out.sync_all()
                .await
                .map_err(|e| Error::new(KIND, "download", &self.object(), &e))?;
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
