//! The `webdav` snapshot store (upstream-behaviour §6.3) with reqwest.
//!
//! `snapshot.webdav.url` is Go's: `http[s]://host[:port]/root?dir=/snapshots&login=U&secret=P`;
//! `dir` (default `/`), `login` and `secret` (both required) are taken out of the query and the
//! rest is the server root. Authentication is HTTP Basic (Go negotiated Basic or Digest). An upload
//! MKCOLs the directory, PUTs the file to `<node name>-temp-snapshot.db` (per node: the next upload
//! replaces a cut-short one's leftover), then MOVEs it over `snapshot.db`, so the previous snapshot
//! stays whole until the new one is. WebDAV has no object metadata: [`Meta`] goes to sidecar
//! `snapshot.db.meta.json` afterwards, trusted only if its size is the object's (else a Go node
//! replaced the object, or the sidecar is being replaced: integrity check, replay).

use std::path::Path;

use futures::future::BoxFuture;
use reqwest::{Method, StatusCode, Url};
use tokio::io::AsyncWriteExt;

use super::store::{Error, Meta, OBJECT, Progress, ProgressReader, SIDECAR, Store};

const KIND: &str = "webdav";

pub struct WebDavStore {
    http: reqwest::Client,
    root: Url,
    dir: Vec<String>,
    login: String,
    secret: String,
    node_name: String,
}

impl WebDavStore {
    /// Parses Go's URL form (module header); fails without `login` or `secret`.
    pub fn new(url: &str, node_name: String) -> Result<WebDavStore, Error> {
        let bad = |why: String| Error::msg(KIND, "configure", OBJECT, why).config();
        let mut parsed = Url::parse(url)
            .map_err(|e| bad(format!("snapshot.webdav.url {url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad(format!(
                "snapshot.webdav.url must be http:// or https://, not {}://",
                parsed.scheme()
            )));
        }
        let (mut dir, mut login, mut secret) = ("/".to_owned(), None, None);
        let mut rest: Vec<(String, String)> = Vec::new();
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "dir" => dir = v.into_owned(),
                "login" => login = Some(v.into_owned()),
                "secret" => secret = Some(v.into_owned()),
                _ => rest.push((k.into_owned(), v.into_owned())),
            }
        }
        let (Some(login), Some(secret)) = (login, secret) else {
            return Err(bad(
                "required parameter missing: snapshot.webdav.url needs login= and secret= query parameters".into(),
            ));
        };
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            // A server that stops answering must not hang a save or a recovery for good.
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| bad(format!("cannot build the HTTP client: {e}")))?;
        Ok(WebDavStore {
            http,
            root: parsed,
            dir: dir
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            login,
            secret,
            node_name,
        })
    }

    /// The URL of `segments` under the root.
    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.root.clone();
        if let Ok(mut path) = u.path_segments_mut() {
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
        }
        u
    }

    fn in_dir(&self, name: &str) -> Url {
        let mut segs: Vec<&str> = self.dir.iter().map(String::as_str).collect();
        segs.push(name);
        self.url(&segs)
    }

    fn object(&self) -> String {
        self.in_dir(OBJECT).path().to_owned()
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .basic_auth(&self.login, Some(&self.secret))
    }

    fn status_error(&self, op: &'static str, what: &str, status: StatusCode) -> Error {
        let e = Error::msg(KIND, op, &self.object(), format!("{what}: HTTP {status}"));
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            e.config()
        } else {
            e
        }
    }

    fn fail(&self, op: &'static str, e: impl std::error::Error + 'static) -> Error {
        Error::new(KIND, op, &self.object(), &e)
    }

    /// Sends `request`; a transport failure is an `op` error.
    async fn send(
        &self,
        op: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        request.send().await.map_err(|e| self.fail(op, e))
    }

    /// MKCOL every level of the directory (existing ones are fine).
    async fn make_dirs(&self) -> Result<(), Error> {
        let mkcol = webdav_method(b"MKCOL")?;
        for depth in 1..=self.dir.len() {
            let segs: Vec<&str> = self.dir[..depth].iter().map(String::as_str).collect();
            let mut url = self.url(&segs);
            if let Ok(mut p) = url.path_segments_mut() {
                p.push("");
            }
            let status = self
                .send("upload", self.request(mkcol.clone(), url))
                .await?
                .status();
            if !(status.is_success()
                || status == StatusCode::METHOD_NOT_ALLOWED
                || status == StatusCode::CONFLICT)
            {
                return Err(self.status_error("upload", "MKCOL", status));
            }
        }
        Ok(())
    }

    async fn sidecar(&self, op: &'static str) -> Result<Option<Meta>, Error> {
        let resp = self
            .send(op, self.request(Method::GET, self.in_dir(SIDECAR)))
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let body = resp.bytes().await.map_err(|e| self.fail(op, e))?;
                Ok(Meta::from_json(&body))
            }
            s => Err(self.status_error(op, "GET metadata", s)),
        }
    }
}

impl Store for WebDavStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn upload<'a>(&'a self, file: &'a Path, meta: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let op = "upload";
            self.make_dirs().await?;
            let f = tokio::fs::File::open(file)
                .await
                .map_err(|e| self.fail(op, e))?;
            let size = f.metadata().await.map_err(|e| self.fail(op, e))?.len();
            // One temporary name per node (module header).
            let temp = format!("{}-temp-snapshot.db", self.node_name);
            let temp_url = self.in_dir(&temp);
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                ProgressReader::new(f, Progress::new(KIND, "Uploading", Some(size))),
                1 << 20,
            ));
            let put = self
                .request(Method::PUT, temp_url.clone())
                .header(reqwest::header::CONTENT_LENGTH, size)
                .body(body);
            let status = self.send(op, put).await?.status();
            if !status.is_success() {
                let _ = self.request(Method::DELETE, temp_url).send().await;
                return Err(self.status_error(op, "PUT", status));
            }
            let moved = self
                .request(webdav_method(b"MOVE")?, temp_url.clone())
                .header("Destination", self.in_dir(OBJECT).as_str())
                .header("Overwrite", "T");
            let moved = self.send(op, moved).await?.status();
            if !moved.is_success() {
                let _ = self.request(Method::DELETE, temp_url).send().await;
                return Err(self.status_error(op, "MOVE", moved));
            }
            let sidecar = self.request(Method::PUT, self.in_dir(SIDECAR));
            let status = self.send(op, sidecar.body(meta.to_json())).await?.status();
            if !status.is_success() {
                return Err(self.status_error(op, "PUT metadata", status));
            }
            tracing::info!(path = %self.object(), size, "Snapshot saved to WebDAV");
            Ok(())
        })
    }

    fn download<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            let op = "download";
            let sidecar = self.sidecar(op).await?;
            let mut resp = self
                .send(op, self.request(Method::GET, self.in_dir(OBJECT)))
                .await?;
            match resp.status() {
                StatusCode::NOT_FOUND => return Ok(None),
                s if s.is_success() => {}
                s => return Err(self.status_error(op, "GET", s)),
            }
            let mut out = tokio::fs::File::create(dest)
                .await
                .map_err(|e| self.fail(op, e))?;
            let mut size = 0u64;
            let mut progress = Progress::new(KIND, "Downloading", resp.content_length());
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.fail(op, e))? {
                size += chunk.len() as u64;
                progress.add(chunk.len());
                out.write_all(&chunk).await.map_err(|e| self.fail(op, e))?;
            }
            // Completes tokio's last write; no fsync: a work file, verified and merged at once.
            out.flush().await.map_err(|e| self.fail(op, e))?;
            tracing::info!(path = %self.object(), size, "Snapshot downloaded from WebDAV");
            Ok(Some(super::store::trusted(sidecar, Some(size))))
        })
    }

    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>> {
        Box::pin(async move {
            let op = "read metadata of";
            let head = self
                .send(op, self.request(Method::HEAD, self.in_dir(OBJECT)))
                .await?;
            match head.status() {
                StatusCode::NOT_FOUND => return Ok(None),
                s if s.is_success() => {}
                s => return Err(self.status_error(op, "HEAD", s)),
            }
            let size = head
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            Ok(Some(super::store::trusted(self.sidecar(op).await?, size)))
        })
    }
}

/// A WebDAV method by name (never another method in its place).
fn webdav_method(name: &'static [u8]) -> Result<Method, Error> {
    Method::from_bytes(name).map_err(|e| Error::new(KIND, "upload", OBJECT, &e))
}
