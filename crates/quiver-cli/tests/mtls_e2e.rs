//! Mutual TLS with the real binary: a server that requires client
//! certificates takes those of its CA (or the ones it lists), refuses the
//! rest with a clear error, and `quiver status --server` shows who is
//! connected.

mod common;

use std::path::{Path, PathBuf};

use common::{closed_addr, err, ok, wait_connections, Node};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }

    /// A client certificate and key issued by this CA, written to `dir`;
    /// returns their paths and the certificate's fingerprint.
    fn issue(&self, dir: &Path, name: &str) -> (String, String, String) {
        self.issue_with(dir, name, |_| {})
    }

    /// As [`Ca::issue`], with the parameters changed by `f` first.
    fn issue_with(
        &self,
        dir: &Path,
        name: &str,
        f: impl FnOnce(&mut CertificateParams),
    ) -> (String, String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        f(&mut p);
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (
            c.display().to_string(),
            k.display().to_string(),
            quiver_sync::tls::fingerprint(cert.der()),
        )
    }
}

#[test]
fn client_certificates_are_required_checked_and_shown() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    let ca = Ca::new("quiver test CA");
    let ca_pem = ca.write(a.dir.path());
    let s = a.serve(&["--client-ca", ca_pem.to_str().unwrap()]);
    let http = s.http.clone().expect("the HTTP endpoint is on by default");

    // No certificate at all.
    let bare = Node::new("bare");
    let (cert, key) = quiver_sync::tls::identity_paths(&bare.db);
    std::fs::remove_file(cert).unwrap();
    std::fs::remove_file(key).unwrap();
    let e = err(
        &bare.db,
        &["sync", &s.addr, "--pin", &s.fp, "--retries", "0"],
    );
    assert!(e.contains("requires a client certificate"), "{e}");

    // The store's own self-signed certificate, not issued by the CA.
    let b = Node::new("b");
    let e = err(&b.db, &["sync", &s.addr, "--pin", &s.fp, "--retries", "0"]);
    assert!(e.contains("refused this client's certificate"), "{e}");

    // A certificate from another CA.
    let other = Ca::new("someone else");
    let (mc, mk, _) = other.issue(b.dir.path(), "mallory");
    // A refused sync with this certificate and key, and its error.
    let refused = |cert: &str, key: &str| {
        err(
            &b.db,
            &[
                "sync",
                &s.addr,
                "--pin",
                &s.fp,
                "--retries",
                "0",
                "--client-cert",
                cert,
                "--client-key",
                key,
            ],
        )
    };
    let e = refused(&mc, &mk);
    assert!(e.contains("not issued by"), "{e}");
    // The CA's own certificates, but expired, or meant for servers only.
    let expired = ca.issue_with(b.dir.path(), "old", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let server_only = ca.issue_with(b.dir.path(), "srv", |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    for ((c, k, _), says) in [
        (expired, "expired"),
        (server_only, "not meant for client authentication"),
    ] {
        let e = refused(&c, &k);
        assert!(e.contains(says), "{e}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !common::http_get(&http, "/metrics")
        .1
        .contains("quiver_refusals_total{code=\"Tls\"} 5")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server counts the five refused handshakes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let e = err(&b.db, &["export", "docs"]);
    assert!(
        e.contains("not a replicated table"),
        "nothing was synced: {e}"
    );
    assert!(err(&b.db, &["sync", &s.addr, "--client-cert", &mc]).contains("--client-key"));

    // A certificate the CA issued: the sync goes through, and while a live
    // link is up the server lists it with the certificate's fingerprint.
    let (ac, ak, afp) = ca.issue(b.dir.path(), "alice");
    ok(
        &b.db,
        &[
            "sync",
            &s.addr,
            "--pin",
            &s.fp,
            "--client-cert",
            &ac,
            "--client-key",
            &ak,
        ],
    );
    assert_eq!(b.export("docs"), a.export("docs"));
    wait_connections(&http, "a finished sync is no longer listed", |c| {
        c.as_array().is_some_and(|l| l.is_empty())
    });
    let mut live = b.live_link(
        &s,
        &["--client-cert", &ac, "--client-key", &ak],
        std::process::Stdio::null(),
    );
    let listed = wait_connections(&http, "no live connection listed", |c| {
        c[0]["live"] == true && c[0]["shards"] == serde_json::json!(["default"])
    });
    let c = &listed["connections"][0];
    assert_eq!(listed["node"], "a");
    assert_eq!(c["node"], "b");
    assert_eq!(c["client_cert"], afp.as_str());
    assert_eq!(c["read_only"], false);
    assert!(c["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(c["bytes_sent"].as_u64().unwrap() > 0 && c["bytes_received"].as_u64().unwrap() > 0);
    // The table for people names the peer and its shard.
    let text = ok(Path::new("unused.db"), &["status", "--server", &http]);
    assert!(text.contains("1 live connection"), "{text}");
    assert!(
        text.contains(" b ") && text.contains("default") && text.contains("client-cert"),
        "{text}"
    );
    live.kill().unwrap();
    live.wait().unwrap();

    // The wrong address gets a hint, not a hang or a panic.
    let closed = closed_addr();
    let e = err(Path::new("unused.db"), &["status", "--server", &closed]);
    assert!(e.contains("HTTP address"), "{e}");
}

#[test]
fn a_client_ca_file_can_list_self_signed_client_certificates() {
    // Without a CA: the server trusts exactly the certificates it lists,
    // here the one `quiver init` made for store b.
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    let b = Node::new("b");
    let c = Node::new("c");
    let (b_cert, _) = quiver_sync::tls::identity_paths(&b.db);
    let s = a.serve(&["--client-ca", b_cert.to_str().unwrap()]);
    ok(&b.db, &["sync", &s.addr, "--pin", &s.fp]);
    assert_eq!(b.export("docs"), a.export("docs"));
    let e = err(&c.db, &["sync", &s.addr, "--pin", &s.fp, "--retries", "0"]);
    assert!(e.contains("refused this client's certificate"), "{e}");
    // A client CA file that is missing is refused at start, naming the key.
    let e = err(
        &a.db,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--client-ca",
            "/no/such.pem",
        ],
    );
    assert!(e.contains("client_ca") && e.contains("not a file"), "{e}");
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Over TLS on TCP the same client CA decides, with the same errors, and
/// the server lists the connection as `tcp` with its certificate.
#[test]
fn client_certificates_are_checked_over_tcp_too() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    let ca = Ca::new("quiver test CA");
    let ca_pem = ca.write(a.dir.path());
    let s = a.serve(&["--client-ca", ca_pem.to_str().unwrap()]);
    let http = s.http.clone().expect("the HTTP endpoint is on by default");
    let tcp = |extra: &[&str]| {
        let mut args = vec![
            "sync",
            s.addr.as_str(),
            "--pin",
            s.fp.as_str(),
            "--retries",
            "0",
            "--transport",
            "tcp",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };

    let bare = Node::new("bare");
    let (cert, key) = quiver_sync::tls::identity_paths(&bare.db);
    std::fs::remove_file(cert).unwrap();
    std::fs::remove_file(key).unwrap();
    let e = err(&bare.db, &args(&tcp(&[])));
    assert!(e.contains("requires a client certificate"), "{e}");

    let b = Node::new("b");
    let e = err(&b.db, &args(&tcp(&[])));
    assert!(e.contains("refused this client's certificate"), "{e}");
    let other = Ca::new("someone else");
    let (mc, mk, _) = other.issue(b.dir.path(), "mallory");
    let e = err(
        &b.db,
        &args(&tcp(&["--client-cert", &mc, "--client-key", &mk])),
    );
    assert!(e.contains("not issued by"), "{e}");
    assert!(err(&b.db, &["export", "docs"]).contains("not a replicated table"));

    let (ac, ak, afp) = ca.issue(b.dir.path(), "alice");
    let out = ok(
        &b.db,
        &[
            &["--json"][..],
            &args(&tcp(&["--client-cert", &ac, "--client-key", &ak])),
        ]
        .concat(),
    );
    assert!(out.contains(r#""transport":"tcp""#), "{out}");
    assert_eq!(b.export("docs"), a.export("docs"));
    let mut live = b.live_link(
        &s,
        &[
            "--client-cert",
            &ac,
            "--client-key",
            &ak,
            "--transport",
            "tcp",
        ],
        std::process::Stdio::null(),
    );
    let listed = wait_connections(&http, "no live connection listed", |c| c[0]["live"] == true);
    let c = &listed["connections"][0];
    assert_eq!(c["transport"], "tcp", "{listed}");
    assert_eq!(c["client_cert"], afp.as_str());
    assert!(c["bytes_sent"].as_u64().unwrap() > 0 && c["bytes_received"].as_u64().unwrap() > 0);
    // A write on the server reaches the live link over TCP.
    a.q(&["put", "docs", "y", "--vector", "[3,4]"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while b.export("docs") != a.export("docs") {
        assert!(
            std::time::Instant::now() < deadline,
            "the live link over TCP did not bring the write"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    live.kill().unwrap();
    live.wait().unwrap();
    let m = common::http_get(&http, "/metrics").1;
    assert!(
        m.lines().any(
            |l| l.starts_with("quiver_connections_total{transport=\"tcp\"}") && !l.ends_with(" 0")
        ),
        "{m}"
    );
}
