//! systemd: the example unit passes `systemd-analyze verify`, and a node started with
//! `NOTIFY_SOCKET` reports `READY=1` once running and `STOPPING=1` on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use crate::require_nats;
use crate::support::{BOOKS_SCHEMA, NatsServer, Node, tempdir};

#[test]
fn example_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze missing and CI=true: run scripts/install-test-servers.sh"
        );
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    };
    let dir = tempdir();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/harmonylite.service"
    ))
    .expect("unit file");
    let unit = unit.replace(
        "/usr/local/bin/harmonylite",
        env!("CARGO_BIN_EXE_harmonylite"),
    );
    assert!(unit.contains("Type=notify"));
    let path = dir.path().join("harmonylite.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("harmonylite.service:"),
        "warnings about the unit: {text}"
    );
}

#[test]
fn readiness_and_stopping_reach_notify_socket() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let dir = tempdir();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut node = Node::new(1, &nats.url, BOOKS_SCHEMA, 1, "");
    node.env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    node.start();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 datagram");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(node.terminate().success());
    let n = sock.recv(&mut buf).expect("STOPPING=1 datagram");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
