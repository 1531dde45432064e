//! One conformance suite for every snapshot store, against real servers on loopback: the NATS
//! object store, `rclone serve s3` (signatures checked), `rclone serve webdav` and OpenSSH's
//! sshd. Then, per store, a brand-new node joins a cluster whose stream has been truncated.

use std::path::Path;
use std::time::Duration;

use harmonylite::config::{S3Settings, SftpSettings};
use harmonylite::snapshot::{Meta, Store, s3::S3Store, sftp::SftpStore, webdav::WebDavStore};

use crate::require_nats;
use crate::support::stores::{Rclone, Sshd, rclone_bin, sshd_bin};
use crate::support::{BOOKS_SCHEMA, NatsServer, Node, tempdir, wait_until};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// A file of `len` pseudo-random bytes (seeded) and its metadata.
fn sample(dir: &Path, name: &str, len: usize, seed: u64) -> (std::path::PathBuf, Meta) {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("sample");
    let (size, sha256, fnv) = harmonylite::snapshot::digest(&path).expect("digest");
    let meta = Meta {
        sha256: Some(sha256),
        size: Some(size),
        positions: Some([("harmonylite-changes-c-1".to_owned(), seed)].into()),
        schema_hash: Some("abc".into()),
        node_id: Some(7),
        created_ms: Some(1_700_000_000_000 + seed as i64),
        fnv_tag: Some(fnv),
    };
    (path, meta)
}

/// What every store must do: nothing stored at first; an upload is read back byte for byte with
/// its metadata; a second upload replaces the first whole; transfers of several MB stream.
/// Returns the metadata stored last.
fn conformance(store: &dyn Store) -> Meta {
    let rt = runtime();
    let dir = tempdir();
    let kind = store.kind();
    assert_eq!(
        rt.block_on(store.meta()).expect("meta of empty"),
        None,
        "{kind}: empty store"
    );
    let dest = dir.path().join("down.db");
    assert_eq!(
        rt.block_on(store.download(&dest))
            .expect("download from empty"),
        None,
        "{kind}: empty store downloads nothing"
    );
    for (round, len) in [(1u64, 70_000usize), (2, 5 * 1024 * 1024 + 3)] {
        let (file, meta) = sample(dir.path(), &format!("up-{round}.db"), len, round);
        rt.block_on(store.upload(&file, &meta))
            .unwrap_or_else(|e| panic!("{kind}: upload {round}: {e}"));
        assert_eq!(
            rt.block_on(store.meta()).expect("meta"),
            Some(meta.clone()),
            "{kind}: metadata of upload {round}"
        );
        let got = rt
            .block_on(store.download(&dest))
            .unwrap_or_else(|e| panic!("{kind}: download {round}: {e}"));
        assert_eq!(got, Some(meta), "{kind}: downloaded metadata {round}");
        assert!(
            std::fs::read(&dest).expect("downloaded") == std::fs::read(&file).expect("uploaded"),
            "{kind}: bytes of upload {round}"
        );
    }
    // An upload that computes the size and checksums itself (on the way, for stores that write
    // their metadata last) stores the same ones as a separate pass over the file.
    let (file, want) = sample(dir.path(), "up-3.db", 3 * 1024 * 1024 + 11, 3);
    let without = Meta {
        size: None,
        sha256: None,
        fnv_tag: None,
        ..want.clone()
    };
    let stored = rt
        .block_on(store.upload_filling(&file, without))
        .unwrap_or_else(|e| panic!("{kind}: upload computing its checksums: {e}"));
    assert_eq!(stored, want, "{kind}: computed metadata");
    assert_eq!(
        rt.block_on(store.meta()).expect("meta"),
        Some(want.clone()),
        "{kind}: stored metadata"
    );
    want
}

fn s3_settings(server: &Rclone, secret: &str) -> S3Settings {
    S3Settings {
        path: "snapshots/node".into(),
        endpoint: format!("127.0.0.1:{}", server.port),
        access_key: server.user.clone(),
        secret: secret.to_owned(),
        session_token: String::new(),
        bucket: "hl-test".into(),
        use_ssl: false,
        region: String::new(),
        force_path_style: None,
    }
}

fn webdav_url(server: &Rclone, secret: &str) -> String {
    format!(
        "http://127.0.0.1:{}/?dir=/snaps/a&login={}&secret={secret}",
        server.port, server.user
    )
}

fn sftp_settings(server: &Sshd, key: bool, known_hosts: bool) -> SftpSettings {
    SftpSettings {
        url: if key {
            format!(
                "sftp://{}@127.0.0.1:{}{}",
                server.user,
                server.port,
                server.root.display()
            )
        } else {
            format!(
                "sftp://{}:{}@127.0.0.1:{}{}",
                server.user,
                server.password,
                server.port,
                server.root.display()
            )
        },
        key_file: key.then(|| server.key.clone()),
        key_passphrase: None,
        known_hosts: known_hosts.then(|| server.known_hosts.clone()),
    }
}

#[test]
fn nats_object_store_conforms() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let rt = runtime();
    let store = rt.block_on(async {
        let client = async_nats::connect(&nats.url).await.expect("connect");
        harmonylite::snapshot::nats::NatsStore::new(
            async_nats::jetstream::new(client),
            "conformance-store".into(),
            1,
        )
    });
    conformance(&store);
    // The client library (like Go) reads what we wrote: same info record, chunks and digest
    // (its reader checks the digest at the end). The first upload's chunks are gone.
    rt.block_on(async {
        use tokio::io::AsyncReadExt as _;
        let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.expect("connect"));
        let bucket = js
            .get_object_store("conformance-store")
            .await
            .expect("bucket");
        let mut object = bucket.get("snapshot.db").await.expect("library get");
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .expect("library read, digest checked");
        let info = bucket.info("snapshot.db").await.expect("info");
        assert_eq!(bytes.len(), info.size);
        assert_eq!(bytes.len(), 3 * 1024 * 1024 + 11);
        let mut stream = js
            .get_stream("OBJ_conformance-store")
            .await
            .expect("stream");
        let held = stream.info().await.expect("stream info").state.messages;
        assert_eq!(
            held,
            info.chunks as u64 + 1,
            "only the newest object's chunks and info"
        );
    });
}

#[test]
fn s3_store_conforms_and_names_the_object_on_errors() {
    let Some(bin) = rclone_bin() else { return };
    let mut server = Rclone::s3(&bin);
    let store = S3Store::new(&s3_settings(&server, &server.secret)).expect("s3 store");
    let want = conformance(&store);
    // Issue 25 item 3: `rclone serve s3` keeps user metadata in memory only. After a restart the
    // positions and checksum still come back (the sidecar), never an empty Meta read as Go's.
    server.restart();
    assert_eq!(
        runtime().block_on(store.meta()).expect("meta"),
        Some(want.clone())
    );
    let dir = tempdir();
    let dest = dir.path().join("after-restart.db");
    assert_eq!(
        runtime().block_on(store.download(&dest)).expect("download"),
        Some(want)
    );
    // A Go node's upload (no metadata) of the same size beside our sidecar is not taken for ours.
    let object = server
        .dir
        .path()
        .join("data/hl-test/snapshots/node/snapshot.db");
    let mut bytes = std::fs::read(&object).expect("the object");
    bytes[100] ^= 1;
    std::fs::write(&object, bytes).expect("replace the object");
    server.restart();
    assert_eq!(
        runtime().block_on(store.meta()).expect("meta"),
        Some(Meta::default())
    );
    // A wrong secret is rejected by the signature check; the error names store and object.
    let wrong = S3Store::new(&s3_settings(&server, "not-the-secret")).expect("s3 store");
    let e = runtime().block_on(wrong.meta()).expect_err("wrong secret");
    let text = e.to_string();
    assert!(
        text.contains("snapshot store s3") && text.contains("hl-test/snapshots/node/snapshot.db"),
        "{text}"
    );
    // One short line that says what to check, not the SDK's dump of the response.
    assert!(
        text.contains("access denied: check snapshot.s3.access_key"),
        "{text}"
    );
    assert!(text.len() < 400 && !text.contains('\n'), "{text}");
}

#[test]
fn webdav_store_conforms_and_names_the_object_on_errors() {
    let Some(bin) = rclone_bin() else { return };
    let server = Rclone::webdav(&bin);
    let store = WebDavStore::new(
        &webdav_url(&server, &server.secret),
        "harmonylite-node-1".into(),
    )
    .expect("webdav store");
    conformance(&store);
    // An upload cut short leaves the node's temporary file; its next upload replaces it.
    let served = server.dir.path().join("data/snaps/a");
    std::fs::write(
        served.join("harmonylite-node-1-temp-snapshot.db"),
        b"cut short",
    )
    .expect("test setup");
    let (file, meta) = sample(served.parent().expect("dir"), "again.db", 1000, 9);
    runtime()
        .block_on(store.upload(&file, &meta))
        .expect("upload");
    let mut left: Vec<String> = std::fs::read_dir(&served)
        .expect("served dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["snapshot.db", "snapshot.db.meta.json"]);
    let wrong = WebDavStore::new(&webdav_url(&server, "nope"), "n".into()).expect("webdav store");
    let e = runtime()
        .block_on(wrong.meta())
        .expect_err("wrong password");
    let text = e.to_string();
    assert!(
        text.contains("snapshot store webdav")
            && text.contains("/snaps/a/snapshot.db")
            && text.contains("401"),
        "{text}"
    );
    assert!(e.is_config());
    // Go's URL rules: login and secret are required.
    let e = WebDavStore::new("http://127.0.0.1:1/?dir=/x", "n".into())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("required parameter missing"), "{e}");
}

#[test]
fn sftp_store_conforms_with_password_and_key_and_checks_host_keys() {
    let Some(bin) = sshd_bin() else { return };
    let Some(server) = Sshd::start(&bin) else {
        return;
    };
    let arc = |s: SftpSettings| {
        std::sync::Arc::new(SftpStore::new(&s, "harmonylite-node-1".into()).expect("sftp store"))
    };
    conformance(&arc(sftp_settings(&server, false, true)));
    // Key authentication, against the same directory: sees what the password session wrote.
    let by_key = arc(sftp_settings(&server, true, true));
    assert!(
        runtime()
            .block_on(by_key.meta())
            .expect("meta by key")
            .is_some()
    );
    // A known_hosts file without this server's key is refused; none at all is accepted (Go).
    let dir = tempdir();
    let other = dir.path().join("known_hosts");
    std::fs::write(&other, "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMx8hVbYkP1aDqL0dIR1m7cN9N0lDd1pCkb4Gp0N9aKj\n").expect("write");
    let mut s = sftp_settings(&server, false, false);
    s.known_hosts = Some(other);
    let e = runtime()
        .block_on(arc(s).meta())
        .expect_err("unknown host key");
    assert!(e.to_string().contains("not in known_hosts"), "{e}");
    assert!(
        runtime()
            .block_on(arc(sftp_settings(&server, false, false)).meta())
            .is_ok()
    );
    // A wrong password: an error naming the store, the object and the cause.
    let mut bad = sftp_settings(&server, false, true);
    bad.url = bad.url.replace(&server.password, "wrong");
    let e = runtime()
        .block_on(arc(bad).meta())
        .expect_err("wrong password");
    let text = e.to_string();
    assert!(
        text.contains("snapshot store sftp")
            && text.contains("snapshot.db")
            && text.contains("authentication"),
        "{text}"
    );
}

/// A brand-new node joins a cluster whose stream was truncated (max_entries 16), through the
/// store configured by `section`.
fn new_node_joins_through(nats: &NatsServer, section: &str) {
    let mut a = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "");
    let mut b = Node::new(2, &nats.url, BOOKS_SCHEMA, 1, "");
    for n in [&a, &b] {
        n.set_max_entries(16);
        n.append_config(section);
    }
    a.start();
    let conn = a.conn();
    for i in 1..=300i64 {
        conn.execute(
            "INSERT INTO Books (id, title, author, publication_year) VALUES (?1, 't', 'a', ?1)",
            [i],
        )
        .expect("insert");
    }
    let want = a.checksum("Books");
    b.start();
    wait_until(Duration::from_secs(60), "the new node converges", || {
        b.checksum("Books") == want
    });
    wait_until(Duration::from_secs(10), "restored", || {
        b.log().contains("Restore complete")
    });
}

/// Issue 25 item 3: a stale snapshot whose store lost every metadata (user metadata kept in
/// memory by `rclone serve s3`, sidecar gone) is not restored as if it reached the stream's first
/// retained sequence (a hole for good): the file records its positions, the node waits for a
/// newer snapshot and converges once the leader saves one.
#[test]
fn a_stale_snapshot_that_lost_its_metadata_is_not_restored_over_a_hole() {
    let bin = require_nats!();
    let Some(rclone) = rclone_bin() else { return };
    let nats = NatsServer::start(&bin);
    let mut server = Rclone::s3(&rclone);
    let section = format!(
        "[snapshot]\nstore = \"s3\"\n[snapshot.s3]\nendpoint = \"127.0.0.1:{}\"\nbucket = \"stale\"\naccess_key = \"{}\"\nsecret = \"{}\"",
        server.port, server.user, server.secret
    );
    let mut a = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "");
    let mut b = Node::new(2, &nats.url, BOOKS_SCHEMA, 1, "");
    for n in [&a, &b] {
        n.set_max_entries(16);
        n.append_config(&section);
    }
    a.start();
    let insert = |conn: &rusqlite::Connection, ids: std::ops::RangeInclusive<i64>| {
        for i in ids {
            conn.execute(
                "INSERT INTO Books (id, title, author, publication_year) VALUES (?1, 't', 'a', ?1)",
                [i],
            )
            .expect("insert");
        }
    };
    insert(&a.conn(), 1..=20);
    wait_until(Duration::from_secs(30), "a first snapshot", || {
        a.log().contains("Snapshot saved to S3")
    });
    // The store goes away while 100 more rows pass through the 16-message stream.
    server.stop();
    insert(&a.conn(), 21..=120);
    wait_until(Duration::from_secs(30), "all published", || {
        a.query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0
    });
    a.terminate();
    let want = a.checksum("Books");
    let sidecar = server.dir.path().join("data/stale/snapshot.db.meta.json");
    std::fs::remove_file(&sidecar).expect("the sidecar exists");
    server.restart();
    b.start();
    wait_until(
        Duration::from_secs(30),
        "the stale snapshot refused",
        || b.log().contains("does not reach"),
    );
    assert!(!b.log().contains("Restore complete"), "{}", b.log());
    a.start();
    wait_until(Duration::from_secs(60), "the new node converges", || {
        b.checksum("Books") == want
    });
    // docs/deployment.md, "The store lost its snapshot": nothing breaks, the leader saves a new
    // one when a joining node asks.
    let data = server.dir.path().join("data/stale");
    for name in ["snapshot.db", "snapshot.db.meta.json"] {
        std::fs::remove_file(data.join(name)).expect("the snapshot exists");
    }
    let mut c = Node::new(3, &nats.url, BOOKS_SCHEMA, 1, "");
    c.set_max_entries(16);
    c.append_config(&section);
    // Restarted: `rclone serve s3` still lists objects deleted behind its back (HTTP 500).
    server.restart();
    c.start();
    wait_until(Duration::from_secs(60), "a third node converges", || {
        c.checksum("Books") == want
    });
}

#[test]
fn new_node_joins_through_each_store() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    new_node_joins_through(&nats, "[snapshot]\nstore = \"nats\"");
    let Some(rclone) = rclone_bin() else { return };
    for (i, kind) in ["s3", "webdav"].into_iter().enumerate() {
        let nats = NatsServer::start(&bin);
        let server = if kind == "s3" {
            Rclone::s3(&rclone)
        } else {
            Rclone::webdav(&rclone)
        };
        let section = if kind == "s3" {
            format!(
                "[snapshot]\nstore = \"s3\"\n[snapshot.s3]\nendpoint = \"127.0.0.1:{}\"\nbucket = \"join-{i}\"\naccess_key = \"{}\"\nsecret = \"{}\"",
                server.port, server.user, server.secret
            )
        } else {
            format!(
                "[snapshot]\nstore = \"webdav\"\n[snapshot.webdav]\nurl = \"{}\"",
                webdav_url(&server, &server.secret)
            )
        };
        new_node_joins_through(&nats, &section);
    }
    let Some(sshd) = sshd_bin() else { return };
    let Some(server) = Sshd::start(&sshd) else {
        return;
    };
    let nats = NatsServer::start(&bin);
    let s = sftp_settings(&server, true, true);
    new_node_joins_through(
        &nats,
        &format!(
            "[snapshot]\nstore = \"sftp\"\n[snapshot.sftp]\nurl = \"{}\"\nkey_file = {:?}\nknown_hosts = {:?}",
            s.url, server.key, server.known_hosts
        ),
    );
}

/// A snapshot store configuration that cannot work stops the daemon at start with exit 2 (an
/// operator's fix, so `RestartPreventExitStatus=2` does not loop it), naming the key.
#[test]
fn an_unusable_store_configuration_exits_2_naming_the_key() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let store = "[snapshot]\nstore = \"webdav\"\n[snapshot.webdav]\nurl = \"ftp://h/x\"\n";
    let a = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, store);
    let (code, out) = crate::support::run_to_exit(&a.config, &[], Duration::from_secs(60));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("snapshot.webdav.url"), "{out}");
}
