//! The `s3` snapshot store (upstream-behaviour §6.3) with aws-sdk-s3: any S3-compatible server
//! (`endpoint` host[:port], `use_ssl`, path-style addressing) or AWS itself (empty endpoint).
//!
//! Object key `<path>/snapshot.db` as Go builds it, but an empty path gives `snapshot.db` (many
//! S3-compatible servers refuse or rename Go's `/snapshot.db`). Credentials follow Go's chain: the
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` environment, then MinIO's
//! (`MINIO_ROOT_USER`/`MINIO_ROOT_PASSWORD`, `MINIO_ACCESS_KEY`/`MINIO_SECRET_KEY`), then the
//! config's `access_key`/`secret`/`session_token` (none: unsigned requests). A PUT replaces the
//! object only once complete: the previous snapshot stays readable. Files up to [`SINGLE_PUT_MAX`]
//! go in one streamed PUT, larger ones as a multipart upload of [`PART_SIZE`] parts read one at a
//! time (bounded memory), aborted on error; a missing bucket is created.
//!
//! [`Meta`] goes into the object's user metadata and, after the object, into sidecar
//! `<path>/snapshot.db.meta.json` too, with the object's ETag: S3-compatible servers may drop user
//! metadata (`rclone serve s3` keeps it in memory only). The sidecar is read only when the
//! metadata is missing, and believed only while the object's ETag is the one it names (a Go node
//! uploads without metadata: a sidecar of ours left beside its object must not be taken for it).

use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;

use super::store::{Error, Meta, OBJECT, Progress, SIDECAR, Store};
use crate::config::S3Settings;

const KIND: &str = "s3";
/// User-metadata key of our [`Meta`] (sent as `x-amz-meta-harmonylite-meta`).
const META_KEY: &str = "harmonylite-meta";
/// Largest file sent in one PUT.
const SINGLE_PUT_MAX: u64 = 256 * 1024 * 1024;
const PART_SIZE: u64 = 64 * 1024 * 1024;

pub struct S3Store {
    client: Client,
    bucket: String,
    key: String,
    ensured: tokio::sync::OnceCell<()>,
}

/// Go's credential chain (module header): `(key, secret, token)`, or `None` for anonymous.
fn credentials(s: &S3Settings) -> Option<(String, String, Option<String>)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(k), Some(s)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Some((k, s, env("AWS_SESSION_TOKEN")));
    }
    for (k, s) in [
        ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
        ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"),
    ] {
        if let (Some(k), Some(s)) = (env(k), env(s)) {
            return Some((k, s, None));
        }
    }
    if s.access_key.is_empty() && s.secret.is_empty() {
        return None;
    }
    Some((
        s.access_key.clone(),
        s.secret.clone(),
        (!s.session_token.is_empty()).then(|| s.session_token.clone()),
    ))
}

/// Our [`Meta`] from an object's user metadata (none for Go's objects).
fn meta_of(metadata: Option<&std::collections::HashMap<String, String>>) -> Meta {
    let json = metadata.and_then(|m| m.get(META_KEY));
    json.and_then(|j| Meta::from_json(j.as_bytes()))
        .unwrap_or_default()
}

impl S3Store {
    /// Builds the client (no request yet); a configuration it cannot use fails, naming the key.
    pub fn new(s: &S3Settings) -> Result<S3Store, Error> {
        let bad = |why: String| Error::msg(KIND, "configure", OBJECT, why).config();
        if s.bucket.is_empty() {
            return Err(bad("snapshot.s3.bucket is empty".into()));
        }
        let region = if s.region.is_empty() {
            std::env::var("AWS_REGION")
                .ok()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "us-east-1".to_owned())
        } else {
            s.region.clone()
        };
        // A silent server must not hang a save or recovery forever. The read timeout runs from a
        // request's start to its response's first byte (sending a part included): generous.
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(300))
            .build();
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .timeout_config(timeouts);
        if !s.endpoint.is_empty() {
            if s.endpoint.contains("://") {
                return Err(bad(format!(
                    "snapshot.s3.endpoint {:?} must be host[:port] without a scheme (use_ssl picks https)",
                    s.endpoint
                )));
            }
            let scheme = if s.use_ssl { "https" } else { "http" };
            b = b
                .endpoint_url(format!("{scheme}://{}", s.endpoint))
                .force_path_style(s.force_path_style.unwrap_or(true));
        } else if let Some(path_style) = s.force_path_style {
            b = b.force_path_style(path_style);
        }
        match credentials(s) {
            Some((key, secret, token)) => {
                let credentials = Credentials::new(key, secret, token, None, "harmonylite");
                b = b.credentials_provider(credentials);
            }
            None => {
                tracing::warn!(
                    "snapshot.s3 has no credentials (config or environment): requests are sent unsigned"
                );
                b = b.allow_no_auth();
            }
        }
        let path = s.path.trim_matches('/');
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
            key: if path.is_empty() {
                OBJECT.to_owned()
            } else {
                format!("{path}/{OBJECT}")
            },
            ensured: tokio::sync::OnceCell::new(),
        })
    }

    fn object(&self) -> String {
        format!("{}/{}", self.bucket, self.key)
    }

    /// `<path>/snapshot.db.meta.json`, beside the object.
    fn sidecar_key(&self) -> String {
        let dir = self.key.strip_suffix(OBJECT).unwrap_or_default();
        format!("{dir}{SIDECAR}")
    }

    /// The object's [`Meta`] from its user `metadata`, or else from the sidecar if it names the
    /// object's `etag` (module header).
    async fn meta_or_sidecar(
        &self,
        op: &'static str,
        metadata: Option<&std::collections::HashMap<String, String>>,
        etag: Option<&str>,
    ) -> Result<Meta, Error> {
        let meta = meta_of(metadata);
        if meta != Meta::default() {
            return Ok(meta);
        }
        let get = self.client.get_object().bucket(&self.bucket);
        let got = match get.key(self.sidecar_key()).send().await {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(meta),
            Err(e) => return Err(self.err(op, e)),
        };
        let body = got.body.collect().await;
        let body = body.map_err(|e| Error::new(KIND, op, &self.object(), &e))?;
        let body = body.into_bytes();
        let names = serde_json::from_slice::<serde_json::Value>(&body).ok();
        let names = names.as_ref().and_then(|v| v.get("etag")?.as_str());
        let ours = etag.is_some() && names == etag;
        Ok(ours
            .then(|| Meta::from_json(&body))
            .flatten()
            .unwrap_or_default())
    }

    /// An SDK error as one line: S3's error code and message (or the HTTP status), with a
    /// hint for credentials; the SDK's own text is a debug dump of the whole response.
    fn err<E>(&self, op: &'static str, e: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = e.raw_response().map(|r| r.status().as_u16());
        let (code, text) = (e.code(), e.message());
        let mut message = match (code, status) {
            (Some(code), _) => format!("{code}: {}", text.unwrap_or("(no message)")),
            (None, Some(status)) => format!("HTTP {status}"),
            (None, None) => DisplayErrorContext(&e).to_string(),
        };
        let denied = [
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ];
        if status == Some(403) || code.is_some_and(|c| denied.contains(&c)) {
            message
                .push_str(" (access denied: check snapshot.s3.access_key and snapshot.s3.secret)");
        }
        Error::msg(KIND, op, &self.object(), message)
    }

    /// Creates the bucket when it is missing (once per process).
    async fn ensure_bucket(&self, op: &'static str) -> Result<(), Error> {
        let create = || async {
            match self.client.head_bucket().bucket(&self.bucket).send().await {
                Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {}
                found => return found.map(|_| ()).map_err(|e| self.err(op, e)),
            }
            match self
                .client
                .create_bucket()
                .bucket(&self.bucket)
                .send()
                .await
            {
                Ok(_) => tracing::info!(bucket = %self.bucket, "Created snapshot bucket"),
                Err(e)
                    if e.as_service_error().is_some_and(|s| {
                        s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
                    }) => {}
                Err(e) => return Err(self.err(op, e)),
            }
            Ok(())
        };
        self.ensured.get_or_try_init(create).await.map(|_| ())
    }

    async fn put_multipart(&self, file: &Path, size: u64, meta: &Meta) -> Result<(), Error> {
        let op = "upload";
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .metadata(META_KEY, meta.to_json())
            .send()
            .await
            .map_err(|e| self.err(op, e))?;
        let Some(id) = created.upload_id() else {
            return Err(Error::msg(
                KIND,
                op,
                &self.object(),
                "the server returned no upload id".into(),
            ));
        };
        let result = self.send_parts(op, file, size, id).await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(id)
                .send()
                .await;
        }
        result
    }

    /// Sends `file` as the parts of multipart upload `id`, then completes the upload.
    async fn send_parts(
        &self,
        op: &'static str,
        file: &Path,
        size: u64,
        id: &str,
    ) -> Result<(), Error> {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < size {
            let len = PART_SIZE.min(size - offset);
            let body = ByteStream::read_from()
                .path(file)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| Error::new(KIND, op, &self.object(), &e))?;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| self.err(op, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
            offset += len;
            number += 1;
            tracing::info!(sent = offset, total = size, "Uploading snapshot to S3");
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err(op, e))?;
        Ok(())
    }
}

impl Store for S3Store {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn upload<'a>(&'a self, file: &'a Path, meta: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.ensure_bucket("upload").await?;
            let size = tokio::fs::metadata(file)
                .await
                .map_err(|e| Error::new(KIND, "upload", &self.object(), &e))?
                .len();
            if size > SINGLE_PUT_MAX {
                self.put_multipart(file, size, meta).await?;
            } else {
                let body = ByteStream::from_path(file)
                    .await
                    .map_err(|e| Error::new(KIND, "upload", &self.object(), &e))?;
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .metadata(META_KEY, meta.to_json())
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| self.err("upload", e))?;
            }
            // The ETag reads will report (servers may answer a multipart upload with another).
            let head = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&self.key);
            let head = head.send().await.map_err(|e| self.err("upload", e))?;
            let etag = head.e_tag();
            let mut json = serde_json::to_value(meta).unwrap_or_default();
            json["etag"] = etag.into();
            let sidecar = self.client.put_object().bucket(&self.bucket);
            let sidecar = sidecar
                .key(self.sidecar_key())
                .body(json.to_string().into_bytes().into());
            sidecar.send().await.map_err(|e| self.err("upload", e))?;
            tracing::info!(bucket = %self.bucket, key = %self.key, size, "Snapshot saved to S3");
            Ok(())
        })
    }

    fn download<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            self.ensure_bucket("download").await?;
            let fail = |e: &(dyn std::error::Error + 'static)| {
                Error::new(KIND, "download", &self.object(), e)
            };
            let got = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .send()
                .await
            {
                Ok(o) => o,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                    return Ok(None);
                }
                Err(e) => return Err(self.err("download", e)),
            };
            let meta = self
                .meta_or_sidecar("download", got.metadata(), got.e_tag())
                .await?;
            let mut out = tokio::fs::File::create(dest).await.map_err(|e| fail(&e))?;
            let mut progress = Progress::new(
                KIND,
                "Downloading",
                got.content_length().map(|l| l.max(0) as u64),
            );
            let mut body = got.body;
            while let Some(chunk) = body.try_next().await.map_err(|e| fail(&e))? {
                out.write_all(&chunk).await.map_err(|e| fail(&e))?;
                progress.add(chunk.len());
            }
            // Completes tokio's last write; no fsync: a work file, verified and merged at once.
            out.flush().await.map_err(|e| fail(&e))?;
            Ok(Some(meta))
        })
    }

    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            self.ensure_bucket("read metadata of").await?;
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .send()
                .await
            {
                Ok(h) => {
                    let (metadata, etag) = (h.metadata(), h.e_tag());
                    Ok(Some(
                        self.meta_or_sidecar("read metadata of", metadata, etag)
                            .await?,
                    ))
                }
                Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
                Err(e) => Err(self.err("read metadata of", e)),
            }
        })
    }
}
