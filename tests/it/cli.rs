//! The binary's command-line contract: exit codes, one-line errors naming the bad key, `-version`,
//! `-cleanup`. None of these need NATS.

use std::process::{Command, Output};

use crate::support::{BOOKS_SCHEMA, Node, tempdir};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harmonylite"))
        .args(args)
        .output()
        .expect("run harmonylite")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn version_flag() {
    let o = run(&["-version"]);
    assert_eq!(o.status.code(), Some(0));
    let line = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    // HarmonyLite <version> (git: <commit>, tag: <tag>, built: <date>, <rustc>, <os>/<arch>)
    let rest = line.strip_prefix("HarmonyLite ").expect("prefix");
    let (version, rest) = rest.split_once(" (git: ").expect("git");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let fields: Vec<&str> = rest
        .strip_suffix(')')
        .expect("closing paren")
        .split(", ")
        .collect();
    assert_eq!(fields.len(), 5, "{line}");
    assert!(
        fields[1].starts_with("tag: ") && fields[2].starts_with("built: "),
        "{line}"
    );
    assert!(fields[3].starts_with("rustc "), "compiler recorded: {line}");
    assert_eq!(
        fields[4],
        format!(
            "{}/{}",
            std::env::consts::OS,
            harmonylite::cli::go_arch(std::env::consts::ARCH)
        )
    );
    if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists() {
        assert!(
            fields[0].len() >= 7 && fields[0].chars().all(|c| c.is_ascii_hexdigit()),
            "commit: {line}"
        );
        assert!(fields[2]["built: ".len()..].ends_with('Z'), "{line}");
    }
}

#[test]
fn unknown_flag_is_usage_error() {
    let o = run(&["-db", "x.db"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(run(&["-h"]).status.code(), Some(0));
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let dir = tempdir();
    for (body, key) in [
        ("[replication_log]\nshards = 0\n", "replication_log.shards"),
        ("cleanup_interval = 0\n", "cleanup_interval"),
        ("scan_max_changes = 0\n", "scan_max_changes"),
        ("[snapshot]\nstore = \"ftp\"\n", "snapshot.store"),
        (
            "[replication_log]\nshards = \"two\"\n",
            "replication_log.shards",
        ),
        ("publish = \n", "config file"),
        ("node_id = 0\n", "node_id"),
        ("db_pth = \"/tmp/x.db\"\n", "did you mean `db_path`"),
        ("[nats]\nurls = [\"nats//h:4222\"]\n", "nats.urls"),
        ("[nats]\nurls = [\"http://h:4222\"]\n", "nats.urls"),
        ("db_path = \"/nonexistent-dir/x.db\"\n", "db_path"),
        (
            "seq_map_path = \"/nonexistent-dir/s.cbor\"\n",
            "seq_map_path",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).expect("write");
        let o = run(&["-config", path.to_str().expect("utf8")]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(2), "{body}: {out}");
        assert!(out.contains(key), "{body}: {out}");
        assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    let o = run(&["-config", "/nonexistent/harmonylite.toml"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bad_prometheus_namespace_exits_2_naming_the_key() {
    let dir = tempdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[prometheus]\nnamespace = \"has space\"\n").expect("write");
    let o = run(&["-config", path.to_str().expect("utf8")]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("prometheus.namespace"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn missing_database_is_a_clear_error() {
    let dir = tempdir();
    let path = dir.path().join("c.toml");
    let db = dir.path().join("missing.db");
    std::fs::write(
        &path,
        format!("db_path = {db:?}\n[nats]\nurls = [\"nats://127.0.0.1:1\"]\n"),
    )
    .expect("write");
    let o = run(&["-config", path.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
}

#[test]
fn unknown_keys_are_warned_not_fatal_and_cleanup_removes_everything() {
    let node = Node::new(1, "nats://127.0.0.1:1", BOOKS_SCHEMA, 1, "bogus_key = 1");
    // Install capture the way the daemon does, then remove it with -cleanup.
    let mut conn = harmonylite::db::open(&node.db).expect("open");
    let tables = harmonylite::db::schema::watched_tables(&conn).expect("tables");
    harmonylite::db::cdc::install(&mut conn, &tables, "h").expect("install");
    drop(conn);
    assert!(
        node.query_i64("SELECT count(*) FROM sqlite_schema WHERE name LIKE '__harmonylite__%'") > 0
    );
    let o = run(&["-config", node.config.to_str().expect("utf8"), "-cleanup"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("Unknown config key ignored") && out.contains("bogus_key"),
        "{out}"
    );
    assert!(out.contains("Cleanup complete..."), "{out}");
    assert_eq!(
        node.query_i64("SELECT count(*) FROM sqlite_schema WHERE name LIKE '%harmonylite%'"),
        0
    );
    node.exec("INSERT INTO Books (title, author) VALUES ('still writable', 'x')");
}
