//! Test harness: real `nats-server` processes on loopback with OS-assigned ports, harmonylite
//! nodes run as the built binary, SQLite helpers, and polling waits. Everything a test starts is
//! killed when its handle drops (also on panic), and lives in a temp dir removed afterwards
//! (set `NO_TEMPDIR_CLEANUP=1` to keep it for debugging).

#![allow(dead_code)]

pub mod stores;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harmonylite::stream::embedded::die_with_parent;
use rusqlite::Connection;

/// Where the install script puts nats-server, relative to the crate root.
const LOCAL_NATS: &str = "target/tools/bin/nats-server";

/// Finds nats-server: `$HARMONYLITE_NATS_SERVER`, the project-local install, then `PATH`.
/// Without one the test is skipped, except under `CI=true`, where it fails.
pub fn nats_server_bin() -> Option<PathBuf> {
    find_tool("HARMONYLITE_NATS_SERVER", LOCAL_NATS, "nats-server")
}

/// Finds a tool: `$<env>`, the project-local install (`local`, relative to the crate root, or
/// absolute), then `PATH`. Missing: skipped, except under `CI=true`, where the test fails.
pub fn find_tool(env: &str, local: &str, name: &str) -> Option<PathBuf> {
    let candidates = std::env::var_os(env)
        .map(PathBuf::from)
        .into_iter()
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join(local)])
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        }));
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name} not found and CI=true: run scripts/install-test-servers.sh");
    }
    eprintln!("SKIPPED: {name} not found; run scripts/install-test-servers.sh");
    None
}

/// Returns early from a test when nats-server is unavailable (outside CI).
#[macro_export]
macro_rules! require_nats {
    () => {
        match $crate::support::nats_server_bin() {
            Some(bin) => bin,
            None => return,
        }
    };
}

/// A temp dir that honours `NO_TEMPDIR_CLEANUP`.
pub fn tempdir() -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix("harmonylite-it-");
    if std::env::var_os("NO_TEMPDIR_CLEANUP").is_some() {
        b.disable_cleanup(true);
    }
    b.tempdir().expect("tempdir")
}

/// Polls `check` every 25 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Like [`wait_until`] but returns whether it happened instead of panicking.
pub fn happens_within(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A nats-server child process with JetStream on a random loopback port.
pub struct NatsServer {
    child: Option<Child>,
    pub url: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    extra: String,
}

impl NatsServer {
    /// Starts a server and waits until its ports file names the client URL.
    pub fn start(bin: &Path) -> NatsServer {
        NatsServer::start_with(bin, "")
    }

    /// Starts a server whose config has `extra` appended (authorization, tls, ...).
    pub fn start_with(bin: &Path, extra: &str) -> NatsServer {
        let dir = tempdir();
        let config = dir.path().join("nats.conf");
        let mut s = NatsServer {
            child: None,
            url: String::new(),
            bin: bin.to_owned(),
            dir,
            config,
            extra: extra.to_owned(),
        };
        s.write_config("-1");
        s.spawn();
        s
    }

    /// The server's own directory (for certificates and key files tests create).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn write_config(&self, port: &str) {
        std::fs::write(
            &self.config,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{ store_dir: {:?} }}\n{}\n",
                self.dir.path().join("js"),
                self.extra
            ),
        )
        .expect("write nats config");
    }

    fn spawn(&mut self) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log");
        let mut cmd = Command::new(&self.bin);
        die_with_parent(&mut cmd);
        let child = cmd
            .arg("-c")
            .arg(&self.config)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        let pid = child.id();
        self.child = Some(child);
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let mut url = String::new();
        wait_until(Duration::from_secs(15), "nats-server ports file", || {
            let Ok(text) = std::fs::read_to_string(&ports_file) else {
                return false;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                return false;
            };
            match v["nats"][0].as_str() {
                Some(u) => {
                    url = u.to_owned();
                    true
                }
                None => false,
            }
        });
        if self.url.is_empty() {
            self.url = url;
        } else if self.url != url {
            // A restart must come back on the same port; pin it in the config and retry.
            panic!("nats-server came back on {url}, expected {}", self.url);
        }
    }

    /// Stops the server (SIGKILL) without removing its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Has the running server reload its config with `extra` in place of the old (SIGHUP).
    pub fn reload(&mut self, extra: &str) {
        let text = std::fs::read_to_string(&self.config).expect("nats config");
        std::fs::write(&self.config, text.replace(&self.extra, extra)).expect("nats config");
        self.extra = extra.to_owned();
        let pid = self.child.as_ref().expect("a running server").id();
        let hup = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status();
        assert!(hup.is_ok_and(|s| s.success()), "reload nats-server");
    }

    /// Restarts a stopped server on the same port with the same data.
    pub fn restart(&mut self) {
        let port = self.url.rsplit(':').next().expect("port").to_owned();
        self.write_config(&port);
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The schema every e2e node starts with (upstream e2e suite).
pub const BOOKS_SCHEMA: &str = "
    CREATE TABLE Books (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL,
                        author TEXT NOT NULL, publication_year INTEGER);
    CREATE TABLE Authors (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                          birth_year INTEGER);";

/// One harmonylite node: its database, config and (when running) process.
pub struct Node {
    pub id: u64,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    starts: usize,
    /// Extra command-line arguments (cluster flags).
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `RLIMIT_FSIZE` for the process: writes past this many bytes in any file fail (a full
    /// disk, as far as SQLite can tell).
    pub file_size_limit: Option<u64>,
}

impl Node {
    /// Creates the database with `schema` and a config pointing at `nats_url`; `extra` is
    /// appended to the top level of the TOML (before any section).
    pub fn new(id: u64, nats_url: &str, schema: &str, shards: u64, extra: &str) -> Node {
        let dir = tempdir();
        let db = dir.path().join(format!("node-{id}.db"));
        Connection::open(&db)
            .and_then(|c| c.execute_batch(schema))
            .expect("create node db");
        let config = dir.path().join("config.toml");
        let node = Node {
            id,
            db,
            config,
            dir,
            child: None,
            starts: 0,
            args: Vec::new(),
            env: Vec::new(),
            file_size_limit: None,
        };
        node.write_config(nats_url, shards, extra);
        node
    }

    /// A node in embedded mode (no `nats.urls`): it runs its own nats-server from `nats_bin`.
    /// `nats_extra` is appended to the `[nats]` section.
    pub fn embedded(
        id: u64,
        nats_bin: &Path,
        shards: u64,
        replicas: u64,
        nats_extra: &str,
    ) -> Node {
        let mut node = Node::new(id, "unused", BOOKS_SCHEMA, shards, "");
        std::fs::write(
            &node.config,
            format!(
                "db_path = {:?}\nseq_map_path = {:?}\nnode_id = {id}\ncleanup_interval = 1000\n\
                 [replication_log]\nshards = {shards}\nreplicas = {replicas}\nmax_entries = 100000\n\
                 [nats]\nbind_address = \"127.0.0.1:-1\"\nserver_binary = {:?}\nreconnect_wait_seconds = 1\n{nats_extra}\n\
                 [logging]\nverbose = true\n",
                node.db,
                node.seq_map(),
                nats_bin
            ),
        )
        .expect("write embedded config");
        node.args.clear();
        node
    }

    /// (Re)writes the config file.
    pub fn write_config(&self, nats_url: &str, shards: u64, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "db_path = {:?}\nseq_map_path = {:?}\nnode_id = {}\ncleanup_interval = 1000\n{extra}\n\
                 [replication_log]\nshards = {shards}\nmax_entries = 100000\n\
                 [nats]\nurls = [{nats_url:?}]\nreconnect_wait_seconds = 1\n\
                 [logging]\nverbose = true\n",
                self.db,
                self.seq_map(),
                self.id
            ),
        )
        .expect("write node config");
    }

    /// Sets `replication_log.max_entries` (the harness default is 100000).
    pub fn set_max_entries(&self, n: u64) {
        self.edit_config("max_entries = 100000\n", &format!("max_entries = {n}\n"));
    }

    /// Appends a section (or keys after the last section) to the config.
    pub fn append_config(&self, text: &str) {
        let old = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&self.config, format!("{old}\n{text}\n")).expect("config");
    }

    /// Replaces the first `from` in the config with `to` (which must be there).
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).expect("config");
        assert!(text.contains(from), "config has no {from:?}");
        std::fs::write(&self.config, text.replacen(from, to, 1)).expect("config");
    }

    /// Adds keys to the `[nats]` section of the config.
    pub fn add_nats_keys(&self, keys: &str) {
        let text = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(
            &self.config,
            text.replacen("[nats]\n", &format!("[nats]\n{keys}\n"), 1),
        )
        .expect("config");
    }

    pub fn seq_map(&self) -> PathBuf {
        self.dir.path().join("seq-map.cbor")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("node-{}.log", self.id))
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the binary and waits until it reports that replication is running.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_started();
    }

    /// Starts the binary without waiting. Spawn from a thread that outlives the node: children
    /// get a parent-death signal tied to the spawning thread.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("node log");
        let err = log.try_clone().expect("log handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_harmonylite"));
        die_with_parent(&mut cmd);
        if let Some(limit) = self.file_size_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit and signal are async-signal-safe; only the child changes.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Without this, the first write past the limit kills the process.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("-config")
            .arg(&self.config)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn harmonylite");
        self.child = Some(child);
        self.starts += 1;
    }

    /// Waits until the latest start reports that replication is running.
    pub fn wait_started(&mut self) {
        let want = self.starts;
        let id = self.id;
        wait_until(
            Duration::from_secs(30),
            &format!("node {id} to start"),
            || {
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    panic!("node {id} exited during start-up: {status}\n{}", self.log());
                }
                self.log().matches("Replication running").count() >= want
            },
        );
    }

    /// The running process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as the upstream e2e suite stops nodes.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the running node to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("node running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!("node {} did not stop on SIGTERM\n{}", self.id, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An application connection (plain SQLite defaults, like the upstream e2e clients).
    pub fn conn(&self) -> Connection {
        let c = Connection::open(&self.db).expect("open node db");
        c.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        c
    }

    /// Runs a statement as the application would.
    pub fn exec(&self, sql: &str) {
        self.conn()
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("node {}: {sql}: {e}", self.id));
    }

    /// First column of the first row, as i64 (0 when no rows).
    pub fn query_i64(&self, sql: &str) -> i64 {
        self.conn()
            .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0))
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(0),
                e => Err(e),
            })
            .unwrap_or_else(|e| panic!("node {}: {sql}: {e}", self.id))
    }

    /// First column of the first row as text, if any.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        self.conn()
            .query_row(sql, [], |r| r.get::<_, Option<String>>(0))
            .ok()
            .flatten()
    }

    /// A checksum of every row of `table` in key order (all storage classes, exact bytes).
    pub fn checksum(&self, table: &str) -> String {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY 1, 2"))
            .expect("checksum query");
        let cols = stmt.column_count();
        let mut rows = stmt.query([]).expect("rows");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut n = 0u64;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        };
        while let Some(row) = rows.next().expect("row") {
            n += 1;
            for i in 0..cols {
                use rusqlite::types::ValueRef;
                match row.get_ref(i).expect("value") {
                    ValueRef::Null => feed(b"N"),
                    ValueRef::Integer(v) => {
                        feed(b"I");
                        feed(&v.to_le_bytes());
                    }
                    ValueRef::Real(v) => {
                        feed(b"R");
                        feed(&v.to_bits().to_le_bytes());
                    }
                    ValueRef::Text(t) => {
                        feed(b"T");
                        feed(&(t.len() as u64).to_le_bytes());
                        feed(t);
                    }
                    ValueRef::Blob(b) => {
                        feed(b"B");
                        feed(&(b.len() as u64).to_le_bytes());
                        feed(b);
                    }
                }
            }
        }
        format!("{n}:{h:016x}")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` nodes (ids 1..=n) with the e2e schema against one server.
pub fn cluster(nats: &NatsServer, n: u64, shards: u64) -> Vec<Node> {
    let mut nodes: Vec<Node> = (1..=n)
        .map(|id| Node::new(id, &nats.url, BOOKS_SCHEMA, shards, ""))
        .collect();
    for node in &mut nodes {
        node.start();
    }
    nodes
}

/// A TCP port that was free a moment ago (for listeners whose address peers must know in advance,
/// like cluster routes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Process ids whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Runs the binary to completion with a config and extra args; returns (exit code, output).
pub fn run_to_exit(config: &Path, args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harmonylite"));
    die_with_parent(&mut cmd);
    let out_path = config.with_extension("out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let mut child = cmd
        .arg("-config")
        .arg(config)
        .args(args)
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn harmonylite");
    let start = Instant::now();
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&out_path).unwrap_or_default())
}

/// Default wait for replication in tests (generous: CI machines are slow and shared).
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(30);
