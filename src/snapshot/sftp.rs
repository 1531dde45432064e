//! The `sftp` snapshot store (upstream-behaviour §6.3) with ssh2 (libssh2), on a blocking thread.
//!
//! `snapshot.sftp.url` is Go's `sftp://user:password@host:port/path` (port 22 when omitted).
//! Authentication: the key in `key_file` (ours; with `key_passphrase`) when set, else the URL's
//! password. The server's host key is checked against `known_hosts` (ours) when set; without one
//! any key is accepted, as Go does, with a warning — set it in production.
//!
//! An upload writes `<path>/<node name>-temp-snapshot.db` (one per node, streamed in 1 MiB writes,
//! fsynced where the server supports it) and renames it over `snapshot.db`. OpenSSH's SFTP
//! (protocol 3) does not rename over an existing file, so when that is refused the old object is
//! moved aside first (and back if the new one cannot take its place): readers may find no snapshot
//! for that instant, never half of one, and a failure leaves the old one. The [`Meta`] goes to the
//! sidecar `snapshot.db.meta.json` the same way (believed as [`super::store::trusted`] says).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use ssh2::{ErrorCode, RenameFlags, Session, Sftp};

use super::store::{Error, Meta, OBJECT, Progress, SIDECAR, Store};
use crate::config::SftpSettings;

const KIND: &str = "sftp";
/// SSH_FX_NO_SUCH_FILE.
const NO_SUCH_FILE: i32 = 2;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

pub struct SftpStore {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    dir: String,
    key_file: Option<PathBuf>,
    key_passphrase: Option<String>,
    known_hosts: Option<PathBuf>,
    node_name: String,
    warned_host_key: AtomicBool,
}

/// Decodes `%XX` escapes (user names and passwords in URLs); invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl SftpStore {
    /// Parses the URL (no connection yet); fails unless `sftp://user@host…` with usable keys.
    pub fn new(s: &SftpSettings, node_name: String) -> Result<SftpStore, Error> {
        let bad = |why: String| Error::msg(KIND, "configure", OBJECT, why).config();
        let url = reqwest::Url::parse(&s.url)
            .map_err(|e| bad(format!("snapshot.sftp.url is not a URL: {e}")))?;
        if url.scheme() != "sftp" {
            return Err(bad(format!(
                "snapshot.sftp.url must start with sftp://, not {}://",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("snapshot.sftp.url has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if url.username().is_empty() {
            return Err(bad("snapshot.sftp.url has no user name".into()));
        }
        if let Some(key) = s.key_file.as_ref().filter(|k| !k.is_file()) {
            let key = key.display();
            return Err(bad(format!(
                "snapshot.sftp.key_file {key} is not a readable file"
            )));
        }
        let password = url.password().map(percent_decode);
        if password.is_none() && s.key_file.is_none() {
            return Err(bad(
                "snapshot.sftp needs a password in the URL or snapshot.sftp.key_file".into(),
            ));
        }
        let dir = percent_decode(url.path());
        Ok(SftpStore {
            host,
            port: url.port().unwrap_or(22),
            user: percent_decode(url.username()),
            password,
            dir: if dir.is_empty() { "/".into() } else { dir },
            key_file: s.key_file.clone(),
            key_passphrase: s.key_passphrase.clone(),
            known_hosts: s.known_hosts.clone(),
            node_name,
            warned_host_key: AtomicBool::new(false),
        })
    }

    fn path_of(&self, name: &str) -> PathBuf {
        Path::new(&self.dir).join(name)
    }

    fn object(&self) -> String {
        format!("{}:{}", self.host, self.path_of(OBJECT).display())
    }

    fn err(&self, op: &'static str, e: impl std::fmt::Display) -> Error {
        Error::msg(KIND, op, &self.object(), e.to_string())
    }

    /// Connects, checks the host key, authenticates.
    fn connect(&self, op: &'static str) -> Result<(Session, Sftp), Error> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| self.err(op, format!("cannot resolve {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| self.err(op, format!("{} has no address", self.host)))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| self.err(op, format!("cannot connect to {addr}: {e}")))?;
        let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
        let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
        let mut sess = Session::new().map_err(|e| self.err(op, e))?;
        sess.set_tcp_stream(tcp);
        sess.set_timeout(IO_TIMEOUT.as_millis() as u32);
        sess.handshake()
            .map_err(|e| self.err(op, format!("SSH handshake: {e}")))?;
        self.check_host_key(&sess, op)?;
        if let Some(banner) = sess.banner() {
            tracing::debug!(banner, "SFTP server banner");
        }
        let authed = match (&self.key_file, &self.password) {
            (Some(key), _) => {
                sess.userauth_pubkey_file(&self.user, None, key, self.key_passphrase.as_deref())
            }
            (None, Some(pw)) => sess.userauth_password(&self.user, pw),
            (None, None) => unreachable!("checked in new()"),
        };
        authed.map_err(|e| {
            self.err(op, format!("authentication as {} failed: {e}", self.user))
                .config()
        })?;
        let sftp = sess
            .sftp()
            .map_err(|e| self.err(op, format!("SFTP subsystem: {e}")))?;
        Ok((sess, sftp))
    }

    fn check_host_key(&self, sess: &Session, op: &'static str) -> Result<(), Error> {
        let Some(file) = &self.known_hosts else {
            if !self.warned_host_key.swap(true, Ordering::Relaxed) {
                tracing::warn!(host = %self.host, "snapshot.sftp.known_hosts is not set: accepting any host key (as Go HarmonyLite does); set it to protect snapshots from a man in the middle");
            }
            return Ok(());
        };
        let mut known = sess.known_hosts().map_err(|e| self.err(op, e))?;
        let kind = ssh2::KnownHostFileKind::OpenSSH;
        known.read_file(file, kind).map_err(|e| {
            let why = format!("cannot read known_hosts {}: {e}", file.display());
            self.err(op, why).config()
        })?;
        let Some((key, _)) = sess.host_key() else {
            return Err(self.err(op, "the server sent no host key"));
        };
        let (host, port, file) = (&self.host, self.port, file.display());
        let why = match known.check_port(host, port, key) {
            ssh2::CheckResult::Match => return Ok(()),
            ssh2::CheckResult::Failure => return Err(self.err(op, "host key check failed")),
            ssh2::CheckResult::Mismatch => {
                format!("HOST KEY MISMATCH for {host}:{port} (known_hosts {file})")
            }
            ssh2::CheckResult::NotFound => {
                format!("host {host}:{port} is not in known_hosts {file}")
            }
        };
        Err(self.err(op, why).config())
    }

    fn mkdir_all(&self, sftp: &Sftp, op: &'static str) -> Result<(), Error> {
        let mut at = PathBuf::from("/");
        for part in Path::new(&self.dir).components().skip(1) {
            at.push(part);
            if sftp.stat(&at).is_err() {
                sftp.mkdir(&at, 0o750)
                    .or_else(|e| sftp.stat(&at).map(|_| ()).map_err(|_| e))
                    .map_err(|e| self.err(op, format!("mkdir {}: {e}", at.display())))?;
            }
        }
        Ok(())
    }

    /// Writes `from` (a reader) to `name` through a temporary file renamed over it.
    fn put(
        &self,
        sftp: &Sftp,
        name: &str,
        from: &mut dyn Read,
        op: &'static str,
    ) -> Result<u64, Error> {
        // One temporary name per node and file: the next upload replaces a cut-short one's.
        let temp = self.path_of(&format!("{}-temp-{name}", self.node_name));
        let dest = self.path_of(name);
        let written = (|| -> Result<u64, Error> {
            let mut f = sftp
                .create(&temp)
                .map_err(|e| self.err(op, format!("create {}: {e}", temp.display())))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            let mut progress = Progress::new(KIND, "Uploading", None);
            loop {
                let n = from.read(&mut buf).map_err(|e| self.err(op, e))?;
                if n == 0 {
                    break;
                }
                progress.add(n);
                f.write_all(&buf[..n])
                    .map_err(|e| self.err(op, format!("write {}: {e}", temp.display())))?;
                total += n as u64;
            }
            let _ = f.fsync();
            f.close().map_err(|e| self.err(op, e))?;
            Ok(total)
        })();
        let total = written.inspect_err(|_| {
            let _ = sftp.unlink(&temp);
        })?;
        let flags = RenameFlags::OVERWRITE | RenameFlags::ATOMIC | RenameFlags::NATIVE;
        if sftp.rename(&temp, &dest, Some(flags)).is_err() {
            // Protocol 3 will not rename over a file (module header).
            let aside = self.path_of(&format!("{name}.old-{}", self.node_name));
            let _ = sftp.unlink(&aside);
            let moved_aside = sftp.rename(&dest, &aside, None).is_ok();
            if let Err(e) = sftp.rename(&temp, &dest, None) {
                if moved_aside {
                    let _ = sftp.rename(&aside, &dest, None);
                }
                let _ = sftp.unlink(&temp);
                return Err(self.err(op, format!("rename to {}: {e}", dest.display())));
            }
            if moved_aside {
                let _ = sftp.unlink(&aside);
            }
        }
        Ok(total)
    }

    fn read_sidecar(&self, sftp: &Sftp, op: &'static str) -> Result<Option<Meta>, Error> {
        match sftp.open(self.path_of(SIDECAR)) {
            Ok(mut f) => {
                let mut text = Vec::new();
                f.read_to_end(&mut text).map_err(|e| self.err(op, e))?;
                Ok(Meta::from_json(&text))
            }
            Err(e) if e.code() == ErrorCode::SFTP(NO_SUCH_FILE) => Ok(None),
            Err(e) => Err(self.err(op, e)),
        }
    }

    fn upload_blocking(&self, file: &Path, meta: &Meta) -> Result<(), Error> {
        let op = "upload";
        let (_sess, sftp) = self.connect(op)?;
        self.mkdir_all(&sftp, op)?;
        let mut f = std::fs::File::open(file).map_err(|e| self.err(op, e))?;
        let bytes = self.put(&sftp, OBJECT, &mut f, op)?;
        self.put(&sftp, SIDECAR, &mut meta.to_json().as_bytes(), op)?;
        tracing::info!(path = %self.object(), bytes, "Snapshot uploaded to SFTP server");
        Ok(())
    }

    fn download_blocking(&self, dest: &Path) -> Result<Option<Meta>, Error> {
        let op = "download";
        let (_sess, sftp) = self.connect(op)?;
        let sidecar = self.read_sidecar(&sftp, op)?;
        let mut remote = match sftp.open(self.path_of(OBJECT)) {
            Ok(f) => f,
            Err(e) if e.code() == ErrorCode::SFTP(NO_SUCH_FILE) => return Ok(None),
            Err(e) => return Err(self.err(op, e)),
        };
        let mut out = std::fs::File::create(dest).map_err(|e| self.err(op, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        let mut progress = Progress::new(KIND, "Downloading", None);
        loop {
            let n = remote.read(&mut buf).map_err(|e| self.err(op, e))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| self.err(op, e))?;
            bytes += n as u64;
            progress.add(n);
        }
        tracing::info!(path = %self.object(), bytes, "Snapshot downloaded from SFTP server");
        Ok(Some(super::store::trusted(sidecar, Some(bytes))))
    }

    fn meta_blocking(&self) -> Result<Option<Meta>, Error> {
        let op = "read metadata of";
        let (_sess, sftp) = self.connect(op)?;
        let size = match sftp.stat(&self.path_of(OBJECT)) {
            Ok(st) => st.size,
            Err(e) if e.code() == ErrorCode::SFTP(NO_SUCH_FILE) => return Ok(None),
            Err(e) => return Err(self.err(op, e)),
        };
        let sidecar = self.read_sidecar(&sftp, op)?;
        Ok(Some(super::store::trusted(sidecar, size)))
    }
}

/// Runs blocking SFTP work off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let done = tokio::task::spawn_blocking(f).await;
    done.map_err(|e| Error::msg(KIND, "run", OBJECT, format!("worker failed: {e}")))?
}

impl Store for Arc<SftpStore> {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn upload<'a>(&'a self, file: &'a Path, meta: &'a Meta) -> BoxFuture<'a, Result<(), Error>> {
        let (me, file, meta) = (Arc::clone(self), file.to_path_buf(), meta.clone());
        Box::pin(blocking(move || me.upload_blocking(&file, &meta)))
    }

    fn download<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<Option<Meta>, Error>> {
        let (me, dest) = (Arc::clone(self), dest.to_path_buf());
        Box::pin(blocking(move || me.download_blocking(&dest)))
    }

    fn meta(&self) -> BoxFuture<'_, Result<Option<Meta>, Error>> {
        let me = Arc::clone(self);
        Box::pin(blocking(move || me.meta_blocking()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_user_and_password_are_decoded() {
        assert_eq!(percent_decode("p%40ss%2Fw%zz%"), "p@ss/w%zz%");
        let s = SftpStore::new(
            &SftpSettings {
                url: "sftp://snap%20user:p%40ss@127.0.0.1:2222/var/snaps".into(),
                key_file: None,
                key_passphrase: None,
                known_hosts: None,
            },
            "n".into(),
        )
        .expect("valid");
        assert_eq!(
            (s.user.as_str(), s.password.as_deref()),
            ("snap user", Some("p@ss"))
        );
        assert_eq!((s.port, s.dir.as_str()), (2222, "/var/snaps"));
        let no_auth = SftpSettings {
            url: "sftp://u@h/x".into(),
            key_file: None,
            key_passphrase: None,
            known_hosts: None,
        };
        let e = SftpStore::new(&no_auth, "n".into()).err().expect("refused");
        assert!(e.is_config() && e.to_string().contains("key_file"), "{e}");
    }
}
