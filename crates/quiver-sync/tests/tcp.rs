//! The TLS-over-TCP transport at its edges, in one process over loopback:
//! a client that completes TLS and HTTP/2 but never says hello is closed
//! at the handshake timeout and freed from the connection count (it must
//! not linger because its HTTP/2 stack answers pings).

use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_store::{CollectionSpec, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::{Identity, Server, ServerOptions, StoreHandle, Trust};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_closed_and_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let mut s = Store::init(&db).unwrap();
    s.create_collection(&CollectionSpec::new("docs", 2))
        .unwrap();
    create_identity(&db, &[]).unwrap();
    let (c, k) = identity_paths(&db);
    let id = Identity::load(&c, &k).unwrap();
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        handshake_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let server = Server::bind(StoreHandle::spawn(s), &id, opts).unwrap();
    let tcp_addr = server.tcp_addr().expect("TCP is on by default");
    assert_eq!(tcp_addr, server.local_addr().unwrap(), "on the same port");
    let active = server.active_connections();
    tokio::spawn(server.run());

    // TLS and HTTP/2 as a client would, then silence (no stream at all).
    let (mut cfg, _) = quiver_sync::tls::client_crypto(&Trust::Insecure, None).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    let (_send, connection) = h2::client::handshake(stream).await.unwrap();
    let started = Instant::now();
    let deadline = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        deadline.is_ok(),
        "the server kept a silent client past its handshake timeout"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    let t = Instant::now();
    while active() != 0 {
        assert!(t.elapsed() < Duration::from_secs(2), "still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
