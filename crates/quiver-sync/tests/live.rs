//! Live links: after catching up, each committed change is pushed within
//! milliseconds, both ways, including writes made to the file by another
//! connection (an application using its own SQLite driver).

use std::time::{Duration, Instant};

use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::{
    CancellationToken, Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle,
    SyncSpec, Trust,
};

fn store(dir: &tempfile::TempDir, name: &str) -> (StoreHandle, std::path::PathBuf) {
    let db = dir.path().join(format!("{name}.db"));
    let mut s = Store::init(&db).unwrap();
    s.create_collection(&CollectionSpec::new("docs", 2))
        .unwrap();
    (StoreHandle::spawn(s), db)
}

async fn wait_for(h: &StoreHandle, id: &str) -> Duration {
    let t = Instant::now();
    loop {
        let id2 = id.to_string();
        if h.call(move |s| s.get("docs", &id2))
            .await
            .unwrap()
            .unwrap()
            .is_some()
        {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{id} never arrived");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_flow_live_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_db) = store(&dir, "a");
    let (b, _) = store(&dir, "b");
    let fp = create_identity(&a_db, &[]).unwrap();
    let (c, k) = identity_paths(&a_db);
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = Server::bind(a.clone(), &Identity::load(&c, &k).unwrap(), opts).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());

    let stop = CancellationToken::new();
    let mut client = Client::new(
        b.clone(),
        ClientOptions {
            trust: Trust::Pin(fp),
            ..Default::default()
        },
    );
    let link_stop = stop.clone();
    let link = tokio::spawn(async move {
        client
            .live(&addr, &SyncSpec::default(), link_stop, None)
            .await
    });

    // Server side write through its handle.
    a.call(|s| s.put("docs", &Record::new("from-a", vec![1.0, 2.0])))
        .await
        .unwrap()
        .unwrap();
    let d1 = wait_for(&b, "from-a").await;
    // Client side write.
    b.call(|s| s.put("docs", &Record::new("from-b", vec![3.0, 4.0])))
        .await
        .unwrap()
        .unwrap();
    let d2 = wait_for(&a, "from-b").await;
    // Another connection writes to the server's file directly.
    let other = rusqlite::Connection::open(&a_db).unwrap();
    other
        .execute(
            "INSERT INTO docs(id, vector, metadata) VALUES ('external', ?1, '{}')",
            [[0f32, 1.0]
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect::<Vec<u8>>()],
        )
        .unwrap();
    let d3 = wait_for(&b, "external").await;
    println!("latencies: a->b {d1:?}, b->a {d2:?}, external a->b {d3:?}");
    stop.cancel();
    link.await.unwrap().unwrap();
}
