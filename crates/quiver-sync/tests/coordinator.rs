//! The shard coordinator over real servers on loopback.

use std::time::{Duration, Instant};

use quiver_store::{CollectionSpec, PeerRecord, Record, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::{
    CoordinatorOptions, Event, Identity, Server, ServerOptions, ShardCoordinator, StoreHandle,
};

struct Node {
    _dir: tempfile::TempDir,
    handle: StoreHandle,
    addr: String,
    fp: String,
}

fn node(name: &str, rows: usize, serve: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{name}.db"));
    let mut s = Store::init(&db).unwrap();
    s.create_collection(&CollectionSpec::new("docs", 8))
        .unwrap();
    let recs: Vec<Record> = (0..rows)
        .map(|i| Record::new(&format!("{name}-{i}"), vec![i as f32; 8]))
        .collect();
    s.put_many("docs", &recs).unwrap();
    let fp = create_identity(&db, &[]).unwrap();
    let handle = StoreHandle::spawn(s);
    let mut addr = String::new();
    if serve {
        let (c, k) = identity_paths(&db);
        let opts = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            node: name.into(),
            ..Default::default()
        };
        let server = Server::bind(handle.clone(), &Identity::load(&c, &k).unwrap(), opts).unwrap();
        addr = server.local_addr().unwrap().to_string();
        tokio::spawn(server.run());
    }
    Node {
        _dir: dir,
        handle,
        addr,
        fp,
    }
}

fn record(name: &str, n: &Node) -> PeerRecord {
    let mut p = PeerRecord::new(name, &n.addr, vec!["default".into()]);
    p.pin = Some(n.fp.clone());
    p
}

async fn count(h: &StoreHandle) -> u64 {
    h.call(|s| s.count("docs")).await.unwrap().unwrap()
}

fn closed_port() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_all_honours_the_concurrency_limit() {
    let servers: Vec<Node> = (0..4).map(|i| node(&format!("s{i}"), 100, true)).collect();
    let local = node("local", 0, false);
    let c = ShardCoordinator::new(
        local.handle.clone(),
        CoordinatorOptions {
            max_concurrent_syncs: 2,
            ..Default::default()
        },
    );
    let mut events = c.subscribe();
    for (i, s) in servers.iter().enumerate() {
        c.register_peer(record(&format!("s{i}"), s)).await.unwrap();
    }
    let started = std::time::Instant::now();
    let results = c.sync_all().await.unwrap();
    let whole_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
    assert_eq!(count(&local.handle).await, 400);
    let st = c.stats();
    assert_eq!(
        st.max_in_flight, 2,
        "never more than two at once, and the limit was reached"
    );
    assert_eq!((st.total_syncs, st.failures), (4, 0));
    // Four syncs: their p95 is the slowest, at least the mean, and each
    // took some time but less than the whole run.
    assert!(st.avg_duration_ms > 0.0, "{st:?}");
    assert!(st.p95_duration_ms >= st.avg_duration_ms, "{st:?}");
    assert!(
        st.p95_duration_ms <= whole_ms,
        "{st:?} within {whole_ms} ms"
    );
    let peers = c.peers().await.unwrap();
    assert!(peers
        .iter()
        .all(|p| p.status == "online" && p.last_contact.is_some()));
    // Events: syncs started and completed, peers connected, remote changes applied.
    let mut seen = (0, 0, 0, 0);
    loop {
        let e = match events.try_recv() {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => break,
        };
        match e {
            Event::SyncStarted { .. } => seen.0 += 1,
            Event::SyncCompleted { .. } => seen.1 += 1,
            Event::PeerConnected { .. } => seen.2 += 1,
            Event::Store { .. } => seen.3 += 1,
            _ => {}
        }
    }
    assert_eq!((seen.0, seen.1, seen.2), (4, 4, 4));
    assert!(seen.3 > 0, "store events are forwarded");
    // sync_shard and sync_with_peer.
    assert_eq!(c.sync_shard("default").await.unwrap().len(), 4);
    c.sync_with_peer("s1").await.unwrap();
    assert!(c.sync_with_peer("nobody").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_peer_is_marked_offline_and_backed_off() {
    let up = node("up", 10, true);
    let local = node("local", 0, false);
    let mut opts = CoordinatorOptions {
        backoff_base: Duration::from_millis(200),
        ..Default::default()
    };
    opts.client.connect_timeout = Duration::from_millis(300);
    let c = ShardCoordinator::new(local.handle.clone(), opts);
    c.register_peer(record("up", &up)).await.unwrap();
    let mut down = PeerRecord::new("down", &closed_port(), vec![]);
    down.pin = Some("00".repeat(32));
    c.register_peer(down).await.unwrap();
    let t = Instant::now();
    let mut rounds = 0;
    while t.elapsed() < Duration::from_millis(1500) {
        c.sync_all().await.unwrap();
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = c.stats();
    let tries = st.attempts.get("down").copied().unwrap_or(0);
    assert!(rounds > 10, "{rounds} rounds");
    assert!(
        (1..=5).contains(&tries),
        "the down peer was tried {tries} times in {rounds} rounds"
    );
    assert!(
        st.attempts.get("up").copied().unwrap_or(0) >= rounds as u64 - 1,
        "the healthy peer was not held back"
    );
    let peers = c.peers().await.unwrap();
    let d = peers.iter().find(|p| p.node == "down").unwrap();
    assert_eq!(d.status, "offline");
    assert!(d.last_error.is_some());
    let health = c.health_check().await.unwrap();
    assert!(health.iter().find(|(n, _)| n == "up").unwrap().1.is_ok());
    assert!(health.iter().find(|(n, _)| n == "down").unwrap().1.is_err());
    assert!(c.unregister_peer("down").await.unwrap());
    assert_eq!(c.peers().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sync_pulls_new_writes() {
    let up = node("up", 1, true);
    let local = node("local", 0, false);
    let c = ShardCoordinator::new(local.handle.clone(), CoordinatorOptions::default());
    c.register_peer(record("up", &up)).await.unwrap();
    c.start_auto_sync_all(Duration::from_millis(100));
    up.handle
        .call(|s| s.put("docs", &Record::new("later", vec![1.0; 8])))
        .await
        .unwrap()
        .unwrap();
    let t = Instant::now();
    while count(&local.handle).await < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "auto-sync never brought the write"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.stop_auto_sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_another_schema_version_is_reported() {
    let up = node("up", 1, true);
    up.handle
        .call(|s| {
            s.connection()
                .execute("UPDATE quiver_tables SET schema_version = 2", [])
                .map(|_| ())
        })
        .await
        .unwrap()
        .unwrap();
    let local = node("local", 0, false);
    let c = ShardCoordinator::new(local.handle.clone(), CoordinatorOptions::default());
    let mut events = c.subscribe();
    c.register_peer(record("up", &up)).await.unwrap();
    let r = c.sync_with_peer("up").await.unwrap();
    assert_eq!(r.schema_outdated, vec!["default".to_string()]);
    let mut found = false;
    loop {
        match events.try_recv() {
            Ok(Event::SchemaOutdated { node, shard }) => {
                assert_eq!((node.as_str(), shard.as_str()), ("up", "default"));
                found = true;
            }
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    assert!(found, "a schema_outdated event was sent");
}
