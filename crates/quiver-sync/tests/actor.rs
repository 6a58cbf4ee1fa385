//! The store thread: typed requests over a bounded queue.

use std::time::Duration;

use quiver_store::{CollectionSpec, Record, RecordColumns, Store};
use quiver_sync::{Request, StoreHandle, REQUEST_QUEUE};

type R = Result<(), Box<dyn std::error::Error>>;

fn handle(dir: &tempfile::TempDir) -> StoreHandle {
    StoreHandle::spawn_unwatched(Store::init(dir.path().join("a.db")).unwrap())
}

#[tokio::test]
async fn writes_are_typed_requests_with_the_store_s_answers() -> R {
    let dir = tempfile::tempdir()?;
    let h = handle(&dir);
    h.create_collection(CollectionSpec::new("docs", 2)).await?;
    h.put("docs", Record::new("a", vec![1.0, 2.0])).await?;
    let rows = RecordColumns {
        ids: vec!["b".into(), "c".into()],
        vectors: vec![1.0, 1.0, 2.0, 2.0],
        metadata: vec!["{}".into(), r#"{"k":1}"#.into()],
        contents: vec![],
    };
    assert_eq!(h.put_columns("docs", rows).await?, 2);
    assert_eq!(
        h.put_many("docs", vec![Record::new("d", vec![0.0, 1.0])])
            .await?,
        1
    );
    assert!(h.delete("docs", "a").await?);
    assert!(!h.delete("docs", "a").await?);
    let out = h.sql("SELECT count(*) FROM docs", vec![]).await?;
    let (_, rows) = out.into_iter().flatten().last().ok_or("no rows")?;
    assert_eq!(rows[0][0], quiver_core::Value::Integer(3));
    h.request(|reply| Request::InitMemory { reply }).await?;
    h.request(|reply| Request::InitMemory { reply }).await?;
    // The store's refusals come back as they are.
    let e = h
        .put("docs", Record::new("x", vec![1.0]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("dimension"), "{e}");
    let e = h
        .request(|reply| Request::Resolve {
            id: 999,
            choice: Ok("nope".into()),
            reply,
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("999"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_senders_wait_instead_of_growing() -> R {
    let dir = tempfile::tempdir()?;
    let h = handle(&dir);
    h.create_collection(CollectionSpec::new("docs", 1)).await?;
    // Hold the store thread, and wait until it is held: puts queued before
    // the blocker runs would be served, and the queue would never fill.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (holding, is_held) = tokio::sync::oneshot::channel::<()>();
    let blocker = {
        let h = h.clone();
        tokio::spawn(async move {
            h.call(move |_| {
                let _ = holding.send(());
                held.recv().ok()
            })
            .await
        })
    };
    is_held.await?;
    let wanted = REQUEST_QUEUE + 50;
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..wanted {
        let h = h.clone();
        puts.spawn(async move {
            h.put("docs", Record::new(&format!("r{i}"), vec![1.0]))
                .await
        });
    }
    let waited = tokio::time::Instant::now();
    while h.queued() < REQUEST_QUEUE && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.queued(), REQUEST_QUEUE, "the queue is bounded");
    assert!(puts.len() == wanted && puts.try_join_next().is_none());
    release.send(())?;
    blocker.await??;
    while let Some(r) = puts.join_next().await {
        r??;
    }
    assert_eq!(h.queued(), 0);
    let n = h.call(|s| s.count("docs")).await??;
    assert_eq!(n as usize, wanted);
    Ok(())
}
