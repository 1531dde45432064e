//! Snapshot-store servers for the tests: `rclone serve s3` (checks signatures) and
//! `rclone serve webdav` from the project-local rclone, and OpenSSH `sshd` with SFTP. Each runs on
//! a loopback port in its own temp dir and is killed when its handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harmonylite::stream::embedded::die_with_parent;

use super::{find_tool, free_port, tempdir, wait_until};

pub fn rclone_bin() -> Option<PathBuf> {
    find_tool("HARMONYLITE_RCLONE", "target/tools/bin/rclone", "rclone")
}

pub fn sshd_bin() -> Option<PathBuf> {
    find_tool("HARMONYLITE_SSHD", "/usr/sbin/sshd", "sshd")
}

fn wait_for_port(port: u16, what: &str) {
    wait_until(Duration::from_secs(20), what, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A server process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Process {
    let out = std::fs::File::create(log).expect("server log");
    let err = out.try_clone().expect("log handle");
    die_with_parent(cmd);
    Process(
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start server"),
    )
}

/// `rclone serve s3` or `rclone serve webdav`.
pub struct Rclone {
    process: Process,
    pub port: u16,
    pub user: String,
    pub secret: String,
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    kind: &'static str,
}

impl Rclone {
    pub fn s3(bin: &Path) -> Rclone {
        Rclone::serve(bin, "s3")
    }

    pub fn webdav(bin: &Path) -> Rclone {
        Rclone::serve(bin, "webdav")
    }

    fn serve(bin: &Path, kind: &'static str) -> Rclone {
        let dir = tempdir();
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let (user, secret) = ("hltest".to_owned(), "hl-secret-123".to_owned());
        let port = free_port();
        let process = launch(bin, kind, dir.path(), port, &user, &secret);
        Rclone {
            process,
            port,
            user,
            secret,
            dir,
            bin: bin.to_owned(),
            kind,
        }
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
    }

    /// Kills the server if it runs and starts it again on the same port and data: what it kept
    /// only in memory (`serve s3`: object metadata) is gone.
    pub fn restart(&mut self) {
        self.stop();
        let (dir, port) = (self.dir.path(), self.port);
        self.process = launch(&self.bin, self.kind, dir, port, &self.user, &self.secret);
    }
}

fn launch(bin: &Path, kind: &str, dir: &Path, port: u16, user: &str, secret: &str) -> Process {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", kind])
        .arg(dir.join("data"))
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(["--config", "/dev/null"]);
    if kind == "s3" {
        cmd.args(["--auth-key", &format!("{user},{secret}")]);
    } else {
        cmd.args(["--user", user, "--pass", secret]);
    }
    let process = spawn(&mut cmd, &dir.join(format!("rclone-{kind}.log")));
    wait_for_port(port, &format!("rclone serve {kind} listening"));
    process
}

/// OpenSSH `sshd` with internal-sftp, a test user with a password and a key, and a known_hosts
/// file for its host key. Needs root (user creation, password checks).
pub struct Sshd {
    _process: Process,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// The client's private key (authorized for `user`).
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// A directory the user may write, for snapshots.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run helper command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sshd {
    pub fn start(bin: &Path) -> Option<Sshd> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("the sshd tests need root (test user, password authentication)");
            }
            eprintln!("SKIPPED: the sshd tests need root");
            return None;
        }
        let (user, password) = ("hlsnap".to_owned(), "hl-Snap-pass-1".to_owned());
        let exists = Command::new("id")
            .arg(&user)
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            let _ = Command::new("useradd")
                .args(["-m", "-s", "/bin/sh", &user])
                .output();
        }
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("chpasswd");
        {
            use std::io::Write as _;
            let stdin = chpasswd.stdin.as_mut().expect("stdin");
            writeln!(stdin, "{user}:{password}").expect("password");
        }
        assert!(chpasswd.wait().expect("chpasswd").success());
        let dir = tempdir();
        let d = dir.path();
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key")));
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f"])
            .arg(d.join("client_key")));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))
            .expect("authorized_keys");
        let root = d.join("sftp-root");
        std::fs::create_dir_all(&root).expect("sftp root");
        run(Command::new("chown").arg(format!("{user}:")).arg(&root));
        // The user must reach its directory through the temp dir.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let port = free_port();
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
                 PasswordAuthentication yes\nPubkeyAuthentication yes\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nAuthorizedKeysFile {}\nAllowUsers {user}\n\
                 Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
                d.join("host_key").display(),
                d.join("sshd.pid").display(),
                d.join("authorized_keys").display(),
            ),
        )
        .expect("sshd config");
        let process = spawn(
            Command::new(bin).args(["-D", "-e", "-f"]).arg(&config),
            &d.join("sshd.log"),
        );
        wait_for_port(port, "sshd listening");
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).expect("host key");
        let known_hosts = d.join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}"))
            .expect("known_hosts");
        Some(Sshd {
            _process: process,
            port,
            user,
            password,
            key: d.join("client_key"),
            known_hosts,
            root,
            _dir: dir,
        })
    }
}
