//! Authentication against external nats-servers: user/password, an NKey user, and mutual TLS with
//! certificates generated here; wrong credentials end start-up with an error naming the problem.

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::require_nats;
use crate::support::{
    BOOKS_SCHEMA, NatsServer, Node, REPLICATION_TIMEOUT, run_to_exit, wait_until,
};

/// Two nodes with `keys` in `[nats]` replicate a row.
fn assert_replicates(url: &str, keys: &str) {
    let mut a = Node::new(1, url, BOOKS_SCHEMA, 1, "");
    let mut b = Node::new(2, url, BOOKS_SCHEMA, 1, "");
    a.add_nats_keys(keys);
    b.add_nats_keys(keys);
    a.start();
    b.start();
    a.exec("INSERT INTO Books (title, author) VALUES ('authenticated', 'x')");
    wait_until(REPLICATION_TIMEOUT, "row on node 2", || {
        b.query_i64("SELECT count(*) FROM Books WHERE title = 'authenticated'") == 1
    });
}

/// A node with `keys` fails to start with exit 1 and output containing every `needles`.
fn assert_rejected(url: &str, keys: &str, needles: &[&str]) {
    let node = Node::new(3, url, BOOKS_SCHEMA, 1, "");
    node.add_nats_keys(keys);
    let (code, out) = run_to_exit(&node.config, &[], Duration::from_secs(30));
    assert_eq!(code, Some(1), "{out}");
    for n in needles {
        assert!(out.contains(n), "missing {n:?} in:\n{out}");
    }
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn user_and_password() {
    let bin = require_nats!();
    let nats = NatsServer::start_with(&bin, "authorization { user: \"hl\", password: \"s3cret\" }");
    assert_replicates(&nats.url, "user_name = \"hl\"\nuser_password = \"s3cret\"");
    assert_rejected(
        &nats.url,
        "user_name = \"hl\"\nuser_password = \"wrong\"",
        &["authorization failed", "nats.user_name"],
    );
    assert_rejected(
        &nats.url,
        "",
        &["authorization failed", "requires credentials"],
    );
}

#[test]
fn nkey_user() {
    let bin = require_nats!();
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with(
        &bin,
        &format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
    );
    let seed_file = nats.dir().join("user.nk");
    std::fs::write(&seed_file, user.seed().expect("seed")).expect("seed file");
    assert_replicates(&nats.url, &format!("seed_file = {seed_file:?}"));

    let stranger = nats.dir().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().expect("seed")).expect("seed file");
    assert_rejected(
        &nats.url,
        &format!("seed_file = {stranger:?}"),
        &["authorization failed", "nats.seed_file"],
    );
    let garbage = nats.dir().join("garbage.nk");
    std::fs::write(&garbage, "not a seed").expect("garbage");
    assert_rejected(
        &nats.url,
        &format!("seed_file = {garbage:?}"),
        &["nats.seed_file", "no user seed"],
    );
}

/// Writes a CA, a server certificate for 127.0.0.1/localhost and a client certificate into `dir`.
fn make_pki(dir: &Path) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "harmonylite test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str, file: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).expect("cert");
        std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).expect("key");
    };
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca");
    leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "server",
        "server",
    );
    leaf(vec!["client".into()], "client", "client");
}

#[test]
fn mutual_tls_with_client_certificate() {
    let bin = require_nats!();
    let pki = crate::support::tempdir();
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f);
    let nats = NatsServer::start_with(
        &bin,
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 2 }}",
            p("server.pem"),
            p("server-key.pem"),
            p("ca.pem")
        ),
    );
    let keys = format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}",
        p("ca.pem"),
        p("client.pem"),
        p("client-key.pem")
    );
    assert_replicates(&nats.url, &keys);
    // A server certificate from an unknown CA is refused.
    let other = crate::support::tempdir();
    make_pki(other.path());
    let wrong_ca = format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}",
        other.path().join("ca.pem"),
        p("client.pem"),
        p("client-key.pem")
    );
    assert_rejected(&nats.url, &wrong_ca, &["TLS failed", "nats.ca_file"]);
    // The server requires a client certificate.
    assert_rejected(
        &nats.url,
        &format!("ca_file = {:?}", p("ca.pem")),
        &["TLS failed"],
    );
    assert_rejected(
        &nats.url,
        "ca_file = \"/nonexistent/ca.pem\"",
        &["nats.ca_file", "not a readable file"],
    );
}

/// TLS configured against a server that does not speak it fails start-up at once, naming the
/// TLS keys, instead of retrying forever on "corrupt message".
#[test]
fn tls_against_a_plain_text_server_is_refused() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let dir = tempfile::tempdir().expect("test setup");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").expect("test setup");
    assert_rejected(
        &nats.url,
        &format!("ca_file = {ca:?}"),
        &["TLS failed", "nats.ca_file"],
    );
}
