//! The library's client and server in one process, over real QUIC on loopback.

use std::time::{Duration, Instant};

use quiver_core::wire::ErrorCode;
use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::{
    Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle, SyncError, SyncSpec, Trust,
};

struct Side {
    _dir: tempfile::TempDir,
    handle: StoreHandle,
    id: Identity,
    fp: String,
}

fn side(name: &str, rows: usize) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{name}.db"));
    let mut s = Store::init(&db).unwrap();
    s.create_collection(&CollectionSpec::new("docs", 2))
        .unwrap();
    let recs: Vec<Record> = (0..rows)
        .map(|i| Record::new(&format!("{name}{i}"), vec![i as f32, 1.0]))
        .collect();
    s.put_many("docs", &recs).unwrap();
    let fp = create_identity(&db, &[]).unwrap();
    let (c, k) = identity_paths(&db);
    Side {
        handle: StoreHandle::spawn(s),
        id: Identity::load(&c, &k).unwrap(),
        fp,
        _dir: dir,
    }
}

fn serve(
    s: &Side,
    listen: &str,
    token: Option<&str>,
) -> (String, tokio_util::sync::CancellationToken) {
    let opts = ServerOptions {
        listen: listen.parse().unwrap(),
        token: token.map(Into::into),
        node: "server".into(),
        ..Default::default()
    };
    let server = Server::bind(s.handle.clone(), &s.id, opts).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let stop = server.shutdown_token();
    tokio::spawn(server.run());
    (addr, stop)
}

async fn count(h: &StoreHandle) -> u64 {
    h.call(|s| s.count("docs")).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuses_connections_and_resumes_with_0rtt() {
    let a = side("a", 10);
    let b = side("b", 5);
    let (addr, _stop) = serve(&a, "127.0.0.1:0", None);
    let mut client = Client::new(
        b.handle.clone(),
        ClientOptions {
            trust: Trust::Pin(a.fp.clone()),
            ..Default::default()
        },
    );
    let first = client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    assert_eq!((first.changes_received, first.changes_sent), (40, 20));
    assert!(!first.connection_reused);
    assert_eq!(count(&a.handle).await, 15);
    assert_eq!(count(&b.handle).await, 15);
    let second = client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    assert!(second.connection_reused, "the open connection is reused");
    assert_eq!(second.changes_received + second.changes_sent, 0);
    let ping = client.ping(&addr).await.unwrap();
    assert!(ping.rtt_ms > 0.0);
    // A fresh connection after closing resumes the TLS session with 0-RTT.
    client.close().await;
    let third = client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    assert!(!third.connection_reused);
    assert!(third.zero_rtt, "reconnect used 0-RTT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_transient_failures_with_backoff_until_the_server_is_back() {
    let a = side("a", 3);
    let b = side("b", 0);
    // Find a free port, then leave it closed for a while.
    let (addr, stop) = serve(&a, "127.0.0.1:0", None);
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = Client::new(
        b.handle.clone(),
        ClientOptions {
            trust: Trust::Pin(a.fp.clone()),
            connect_timeout: Duration::from_millis(300),
            retries: 6,
            ..Default::default()
        },
    );
    let restart_addr = addr.clone();
    let a_handle = a.handle.clone();
    let a_id = Identity::load(
        &identity_paths(a.handle.path()).0,
        &identity_paths(a.handle.path()).1,
    )
    .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let opts = ServerOptions {
            listen: restart_addr.parse().unwrap(),
            ..Default::default()
        };
        let server = Server::bind(a_handle, &a_id, opts).unwrap();
        server.run().await.unwrap();
    });
    let started = std::time::Instant::now();
    let r = client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    assert!(r.attempts > 1, "it retried ({} attempts)", r.attempts);
    // The server came back after 700 ms: the reported duration covers the
    // failed attempts and the waits, not the last attempt only.
    assert!(
        r.duration_ms >= 600 && r.duration_ms as u128 <= started.elapsed().as_millis(),
        "duration {} ms",
        r.duration_ms
    );
    assert_eq!(count(&b.handle).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn does_not_retry_refusals() {
    let a = side("a", 1);
    let b = side("b", 0);
    let (addr, _stop) = serve(&a, "127.0.0.1:0", Some("secret"));
    let mut client = Client::new(
        b.handle.clone(),
        ClientOptions {
            trust: Trust::Pin(a.fp.clone()),
            token: Some("guess".into()),
            retries: 5,
            ..Default::default()
        },
    );
    let t = Instant::now();
    let e = client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            SyncError::Refused {
                code: ErrorCode::Unauthorized,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "no backoff on a refusal"
    );
    let state = b.handle.call(|s| s.sync_state()).await.unwrap().unwrap();
    assert!(state.last_error.unwrap().contains("invalid token"));
    // An untrusted certificate is not retried either.
    let mut client = Client::new(
        b.handle.clone(),
        ClientOptions {
            token: Some("secret".into()),
            retries: 5,
            ..Default::default()
        },
    );
    let e = client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, SyncError::Untrusted(_)), "{e}");
}

/// A replica holding nothing of a table receives it as a snapshot, and the
/// progress counts its rows against the rows in all; later syncs are
/// deltas, and the progress says how far into the offered versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_progress_says_how_far_into_the_offered_versions() {
    let a = side("a", 0);
    let put = |from: usize| {
        let h = a.handle.clone();
        async move {
            for i in from..from + 8 {
                let rec = Record::new(&format!("single{i}"), vec![i as f32, 2.0]);
                h.call(move |s| s.put("docs", &rec)).await.unwrap().unwrap();
            }
        }
    };
    put(0).await;
    let b = side("b", 0);
    // The server sends one change a batch, so that progress moves step by step.
    let opts = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        stream: quiver_store::StreamLimits {
            max_changes: 1,
            max_bytes: 1 << 20,
        },
        ..Default::default()
    };
    let server = Server::bind(a.handle.clone(), &a.id, opts).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());
    type Seen = Vec<(u64, u64, Option<(u64, u64)>, u64)>;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::new()));
    let log = seen.clone();
    let progress: quiver_sync::ProgressFn = std::sync::Arc::new(move |p| {
        if let quiver_sync::Progress::Pulling {
            versions_done,
            versions_total,
            snapshot_rows_done,
            snapshot_rows_total,
            bytes,
            ..
        } = p
        {
            let snap = snapshot_rows_done.zip(snapshot_rows_total);
            log.lock()
                .unwrap()
                .push((versions_done, versions_total, snap, bytes));
        }
    });
    let mut client = Client::new(
        b.handle.clone(),
        ClientOptions {
            trust: Trust::Pin(a.fp.clone()),
            ..Default::default()
        },
    );
    let r = client
        .sync(&addr, &SyncSpec::default(), Some(progress.clone()))
        .await
        .unwrap();
    assert_eq!(r.snapshot_rows, 8, "{r:?}");
    assert_eq!(r.snapshot_tables, ["default.docs"], "{r:?}");
    let first: Seen = std::mem::take(&mut *seen.lock().unwrap());
    let rows: Vec<(u64, u64)> = first.iter().filter_map(|s| s.2).collect();
    assert_eq!(rows.last(), Some(&(8, 8)), "every row of eight: {first:?}");
    assert!(rows.len() >= 8, "one report a row: {first:?}");
    assert!(
        rows.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 == w[1].1),
        "rows only go up, against a fixed total: {first:?}"
    );
    assert!(
        first.windows(2).all(|w| w[0].3 <= w[1].3) && first.last().unwrap().3 > 0,
        "bytes counted: {first:?}"
    );

    put(8).await;
    let r = client
        .sync(&addr, &SyncSpec::default(), Some(progress))
        .await
        .unwrap();
    assert_eq!(r.snapshot_rows, 0, "a delta now: {r:?}");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| s.2.is_none()), "{seen:?}");
    let (done, total, _, _) = *seen.last().unwrap();
    assert!(total >= 8, "eight transactions offered: {seen:?}");
    assert_eq!(done, total, "all of them received: {seen:?}");
    assert!(seen.len() >= 8, "one report a batch: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress never goes back: {seen:?}"
    );
    assert!(seen[0].0 < total, "it starts below the end: {seen:?}");
}

/// A row inserted and deleted again and again by another connection while
/// its store serves syncs: every batch must be read from one snapshot, or a
/// batch pairs the row's record with values of another moment (a deleted
/// row's NULLs) and the receiver refuses it. `QUIVER_RACE_SYNCS` sets the
/// number of syncs (default 300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_stay_consistent_while_a_row_is_inserted_and_deleted() {
    let syncs: usize = std::env::var("QUIVER_RACE_SYNCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let x = side("x", 20);
    let y = side("y", 0);
    let (addr, _stop) = serve(&x, "127.0.0.1:0", None);
    let path = x.handle.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = stop.clone();
    // Another writer of x's file, as an application with its own driver.
    let writer = std::thread::spawn(move || {
        let mut s = Store::open(&path).unwrap();
        let mut n = 0u64;
        while !writing.load(std::sync::atomic::Ordering::Relaxed) {
            let mut r = Record::new("id0", vec![n as f32, 1.0]);
            r.metadata = serde_json::json!({"n": n});
            s.put("docs", &r).unwrap();
            s.delete("docs", "id0").unwrap();
            n += 1;
        }
        n
    });
    let mut client = Client::new(
        y.handle.clone(),
        ClientOptions {
            trust: Trust::Pin(x.fp.clone()),
            retries: 0,
            ..Default::default()
        },
    );
    let mut failures = Vec::new();
    for _ in 0..syncs {
        if let Err(e) = client.sync(&addr, &SyncSpec::default(), None).await {
            failures.push(e.to_string());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cycles = writer.join().unwrap();
    assert!(cycles > 0);
    assert!(
        failures.is_empty(),
        "{} of {syncs} syncs failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    // Once the writer stops, one more sync leaves y as x.
    client
        .sync(&addr, &SyncSpec::default(), None)
        .await
        .unwrap();
    let export = |h: StoreHandle| async move {
        h.call(|s| {
            let mut out = Vec::new();
            s.export("docs", &mut out).map(|_| out)
        })
        .await
        .unwrap()
        .unwrap()
    };
    assert_eq!(
        export(x.handle.clone()).await,
        export(y.handle.clone()).await
    );
}
