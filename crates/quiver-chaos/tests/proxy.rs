//! The fault proxy as a separate process between the library's client and
//! server (real QUIC on loopback): faults really happen, commands answer,
//! and a sync through a hostile link still ends with equal replicas.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::{
    Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle, SyncSpec, TcpListen,
    Transport, TransportChoice, Trust,
};

struct Proxy {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    addr: String,
}

impl Proxy {
    fn start(upstream: &str, faults: &str) -> Proxy {
        Proxy::start_at("127.0.0.1:0", upstream, faults)
    }

    fn start_at(listen: &str, upstream: &str, faults: &str) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quiver-chaos"))
            .args(["--listen", listen, "--upstream", upstream])
            .args(["--seed", "42", "--faults", faults])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert!(first.contains("seed 42"), "{first}");
        let addr = first.split_whitespace().nth(3).unwrap().to_string();
        Proxy {
            child,
            stdin,
            out,
            addr,
        }
    }

    fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        let mut answer = String::new();
        self.out.read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store(dir: &tempfile::TempDir, name: &str, rows: usize) -> (StoreHandle, std::path::PathBuf) {
    let db = dir.path().join(format!("{name}.db"));
    let mut s = Store::init(&db).unwrap();
    s.create_collection(&CollectionSpec::new("docs", 16))
        .unwrap();
    let recs: Vec<Record> = (0..rows)
        .map(|i| Record::new(&format!("{name}{i}"), vec![i as f32; 16]))
        .collect();
    s.put_many("docs", &recs).unwrap();
    (StoreHandle::spawn(s), db)
}

async fn export(h: &StoreHandle) -> Vec<u8> {
    h.call(|s| {
        let mut buf = Vec::new();
        s.export("docs", &mut buf).map(|_| buf)
    })
    .await
    .unwrap()
    .unwrap()
}

#[test]
fn commands_answer_and_bad_ones_are_refused() {
    let mut p = Proxy::start("127.0.0.1:9", "");
    assert_eq!(p.command("set up loss=0.5 delay_ms=10"), "ok");
    assert_eq!(p.command("partition down"), "ok");
    assert_eq!(p.command("heal"), "ok");
    for bad in [
        "set loss=2",
        "set loss=x",
        "set colour=blue",
        "set loss",
        "dance",
    ] {
        assert!(p.command(bad).starts_with("error: "), "{bad} was taken");
    }
    let stats: serde_json::Value = serde_json::from_str(&p.command("stats")).unwrap();
    assert_eq!(stats["up"]["seen"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_through_loss_jitter_reordering_and_duplicates_ends_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_db) = store(&dir, "a", 3000);
    let (b, _) = store(&dir, "b", 200);
    let fp = create_identity(&a_db, &[]).unwrap();
    let (c, k) = identity_paths(&a_db);
    let id = Identity::load(&c, &k).unwrap();
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = Server::bind(a.clone(), &id, opts).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());
    let mut p = Proxy::start(
        &addr,
        "loss=0.1 delay_ms=20 jitter_ms=20 reorder=true dup=0.05",
    );
    let mut client = Client::new(
        b.clone(),
        ClientOptions {
            trust: Trust::Pin(fp),
            ..Default::default()
        },
    );
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        client.sync(&p.addr, &SyncSpec::default(), None),
    )
    .await
    .expect("the sync ends")
    .unwrap();
    assert_eq!(r.changes_received, 3000 * 4);
    assert_eq!(export(&a).await, export(&b).await);
    let stats: serde_json::Value = serde_json::from_str(&p.command("stats")).unwrap();
    for dir in ["up", "down"] {
        assert!(stats[dir]["dropped"].as_u64().unwrap() > 0, "{stats}");
        assert!(stats[dir]["duplicated"].as_u64().unwrap() > 0, "{stats}");
    }
}

/// Log lines, kept for the test to read.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_link_says_when_it_is_lost_and_when_it_is_back() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_env_filter("quiver_sync=warn")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (a, a_db) = store(&dir, "a", 10);
    let (b, _) = store(&dir, "b", 0);
    let fp = create_identity(&a_db, &[]).unwrap();
    let (c, k) = identity_paths(&a_db);
    let id = Identity::load(&c, &k).unwrap();
    let limits = quiver_sync::transport::TransportLimits {
        idle_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_millis(300),
        ..Default::default()
    };
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        limits: limits.clone(),
        ..Default::default()
    };
    let server = Server::bind(a.clone(), &id, opts).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());
    let mut p = Proxy::start(&addr, "");
    let mut client = Client::new(
        b.clone(),
        ClientOptions {
            trust: Trust::Pin(fp),
            limits,
            ..Default::default()
        },
    );
    let stop = quiver_sync::CancellationToken::new();
    let (to, s2) = (p.addr.clone(), stop.clone());
    let link = tokio::spawn(async move { client.live(&to, &SyncSpec::default(), s2, None).await });
    let has = |h: StoreHandle, id: &'static str| async move {
        h.call(move |s| s.get("docs", id))
            .await
            .unwrap()
            .unwrap()
            .is_some()
    };
    let wait_for = |h: StoreHandle, id: &'static str, secs: u64| async move {
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if has(h.clone(), id).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(wait_for(b.clone(), "a9", 20).await, "the first round");
    assert_eq!(p.command("partition"), "ok");
    a.put("docs", Record::new("during", vec![1.0; 16]))
        .await
        .unwrap();
    // Past the idle timeout: the link notices it is gone.
    let t = std::time::Instant::now();
    while !logs.text().contains("lost") && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        logs.text()
            .contains(&format!("live link to {} lost", p.addr)),
        "{}",
        logs.text()
    );
    assert!(!has(b.clone(), "during").await);
    assert_eq!(p.command("heal"), "ok");
    assert!(
        wait_for(b.clone(), "during", 30).await,
        "the row after the heal"
    );
    // Said once the round that brought the row has ended.
    let back = format!("live link to {} back after", p.addr);
    let t = std::time::Instant::now();
    while !logs.text().contains(&back) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logs.text().contains(&back), "{}", logs.text());
    stop.cancel();
    link.await.unwrap().unwrap();
}

/// UDP really dropped on the way (the proxy's port takes UDP and drops
/// every datagram; the server's TCP listens on the same port number):
/// `auto` falls back to TLS over TCP and says so; with UDP through again,
/// a new client goes back to QUIC; `quic` alone does not get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_where_udp_is_dropped_and_back_to_quic_after() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_db) = store(&dir, "a", 500);
    let (b, _) = store(&dir, "b", 20);
    let fp = create_identity(&a_db, &[]).unwrap();
    let (c, k) = identity_paths(&a_db);
    let id = Identity::load(&c, &k).unwrap();
    // A port number free on both UDP and TCP: the proxy's and the server's TCP.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shared: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        tcp_listen: TcpListen::At(shared),
        ..Default::default()
    };
    let server = Server::bind(a.clone(), &id, opts).unwrap();
    let quic_addr = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());
    let mut p = Proxy::start_at(&shared.to_string(), &quic_addr, "loss=1");
    let client = |transport| {
        Client::new(
            b.clone(),
            ClientOptions {
                trust: Trust::Pin(fp.clone()),
                connect_timeout: Duration::from_secs(2),
                retries: 0,
                transport,
                ..Default::default()
            },
        )
    };
    let to = shared.to_string();
    let e = client(TransportChoice::Quic)
        .sync(&to, &SyncSpec::default(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("can UDP reach it"), "{e}");

    let started = std::time::Instant::now();
    let mut auto = client(TransportChoice::Auto);
    let r = auto.sync(&to, &SyncSpec::default(), None).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.transport, Transport::Tcp);
    assert_eq!(r.changes_received, 500 * 4);
    assert_eq!(export(&a).await, export(&b).await);
    assert!(took < Duration::from_secs(2), "fell back in {took:?}");
    let stats: serde_json::Value = serde_json::from_str(&p.command("stats")).unwrap();
    assert!(stats["up"]["dropped"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["down"]["seen"], 0, "{stats}");
    auto.close().await;

    // UDP gets through again. The client that fell back keeps to TCP for a
    // while (it tries QUIC again later); a new client takes QUIC.
    assert_eq!(p.command("set loss=0"), "ok");
    let r = auto.sync(&to, &SyncSpec::default(), None).await.unwrap();
    assert_eq!(r.transport, Transport::Tcp);
    assert!(!r.connection_reused);
    auto.close().await;
    let mut again = client(TransportChoice::Auto);
    let r = again.sync(&to, &SyncSpec::default(), None).await.unwrap();
    assert_eq!(r.transport, Transport::Quic);
    again.close().await;
}

/// A server that restarts behind the relay: the relay keeps the path (the
/// kernel's "port unreachable" while it is down does not end it), and the
/// same client gets through again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_survives_a_server_restart_behind_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_db) = store(&dir, "a", 50);
    let (b, _) = store(&dir, "b", 0);
    let fp = create_identity(&a_db, &[]).unwrap();
    let (c, k) = identity_paths(&a_db);
    let id = Identity::load(&c, &k).unwrap();
    let serve = |listen: &str| {
        let opts = ServerOptions {
            listen: listen.parse().unwrap(),
            tcp_listen: TcpListen::Off,
            ..Default::default()
        };
        let server = Server::bind(a.clone(), &id, opts).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let stop = server.shutdown_token();
        (tokio::spawn(server.run()), addr, stop)
    };
    let (run, addr, stop) = serve("127.0.0.1:0");
    let p = Proxy::start(&addr, "");
    let mut client = Client::new(
        b.clone(),
        ClientOptions {
            trust: Trust::Pin(fp),
            transport: TransportChoice::Quic,
            connect_timeout: Duration::from_secs(2),
            retries: 0,
            ..Default::default()
        },
    );
    client
        .sync(&p.addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    stop.cancel();
    run.await.unwrap().unwrap();
    // Down: the client's datagrams reach a closed port through the relay.
    assert!(client
        .sync(&p.addr, &SyncSpec::default(), None)
        .await
        .is_err());
    let (_run, _, _stop) = serve(&addr);
    a.put("docs", Record::new("after", vec![1.0; 16]))
        .await
        .unwrap();
    let r = client
        .sync(&p.addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    assert!(r.changes_received > 0);
    assert_eq!(export(&a).await, export(&b).await);
}
