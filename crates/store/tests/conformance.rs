//! Runs the shared conformance suite against SQLite (always) and PostgreSQL
//! (when `SWITCHYARD_TEST_PG_URL` is set; `SWITCHYARD_REQUIRE_PG=1` makes its
//! absence a failure, as CI does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use switchyard_core::config::StoreConfig;
use switchyard_store::{conformance, PostgresStore, SessionStore, SqliteStore, Store};

#[tokio::test]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        url: format!("sqlite://{}/nested/db.sqlite", dir.path().display()),
        ..StoreConfig::default()
    };
    let store = SqliteStore::connect(&config).await.unwrap();
    store.migrate().await.unwrap();
    conformance::run_all(&store).await;
    assert!(
        store.inline_counts().0 > 0,
        "the suite covers the inline path"
    );
    store.close().await;
}

/// A file-backed SQLite store (so with its inline path) in `dir`, and its URL.
async fn file_store(dir: &tempfile::TempDir) -> (std::sync::Arc<SqliteStore>, String) {
    let url = format!("sqlite://{}/db.sqlite", dir.path().display());
    let config = StoreConfig {
        url: url.clone(),
        ..StoreConfig::default()
    };
    let store = std::sync::Arc::new(SqliteStore::connect(&config).await.unwrap());
    store.migrate().await.unwrap();
    (store, url)
}

/// The writer connection a write went through is back in its pool once
/// sqlx has pinged it, a moment after the write; until then a reply's write
/// is handed to the pool (which waits for it). A reply's writes are far
/// enough apart (a provider call lies between them); the tests wait.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Another process's open write transaction on the file at `url`.
async fn hold_write_lock(
    url: &str,
) -> (sqlx::SqlitePool, sqlx::pool::PoolConnection<sqlx::Sqlite>) {
    let other = sqlx::SqlitePool::connect(url).await.unwrap();
    let mut lock = other.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    (other, lock)
}

#[tokio::test]
async fn sqlite_reads_and_writes_a_reply_inline_and_queues_when_the_file_is_locked() {
    use switchyard_core::sessions::{MessageCompletion, MessageStatus};
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = file_store(&dir).await;
    let session = conformance::sample_session("t", Some("u"), None);
    store.insert_session(&session).await.unwrap();
    let turn = |content: &str| {
        let mut user =
            conformance::sample_message("t", &session.id, "user", MessageStatus::Complete);
        user.content = content.into();
        let reply =
            conformance::sample_message("t", &session.id, "assistant", MessageStatus::Streaming);
        [user, reply]
    };

    settle().await;
    let before = store.inline_counts();
    let first = turn("first");
    store.insert_messages(&first).await.unwrap();
    let done = MessageCompletion {
        tenant_id: "t".into(),
        id: first[1].id.clone(),
        status: MessageStatus::Complete,
        content: "hello".into(),
        finish_reason: Some("stop".into()),
        error_code: None,
        error_message: None,
        prompt_tokens: Some(3),
        completion_tokens: Some(1),
        cost_usd: Some(0.5),
        latency_ms: Some(1.25),
        frames: Some("[]".into()),
        at_ms: 1,
    };
    settle().await;
    assert!(store.complete_message(&done).await.unwrap());
    settle().await;
    assert!(
        !store.complete_message(&done).await.unwrap(),
        "completed once"
    );
    let (_, history) = store
        .session_and_history("t", &session.id, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        history,
        [
            ("assistant".to_owned(), "hello".to_owned()),
            ("user".to_owned(), "first".to_owned())
        ],
        "newest first"
    );
    assert!(store
        .session_and_history("another tenant", &session.id, 10)
        .await
        .unwrap()
        .is_none());
    let after = store.inline_counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (5, 0),
        "one insert, two completions and two reads, all inline"
    );

    // Another process holds the write lock: the inline write does not wait
    // on this thread, the statement goes to the pool, which waits its turn.
    let (other, mut lock) = hold_write_lock(&url).await;
    let second = turn("second");
    let write = tokio::spawn({
        let store = store.clone();
        let second = second.clone();
        async move { store.insert_messages(&second).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the write waits for the lock");
    assert_eq!(store.inline_counts().1, after.1 + 1, "handed to the pool");
    sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
    write.await.unwrap().unwrap();
    let all = store
        .list_messages("t", &session.id, None, 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 4, "each message stored once");
    assert_eq!(all[2], second[0]);
    assert_eq!(all[3], second[1]);
    drop(lock);
    other.close().await;
    store.close().await;
}

#[tokio::test]
async fn sqlite_writes_writer_batches_inline_and_queues_them_when_the_file_is_locked() {
    use switchyard_core::sessions::{BusEvent, EventsRow};
    let dir = tempfile::tempdir().unwrap();
    let (store, url) = file_store(&dir).await;
    let event = |n: i64| BusEvent {
        id: switchyard_core::usage::new_id(),
        tenant_id: "t".into(),
        trace_id: format!("{n:032x}"),
        seq: 0,
        kind: "request.done".into(),
        session_id: None,
        user_id: Some("u".into()),
        payload: serde_json::json!({"n": n}),
        created_at_ms: 1_760_000_000_000 + n,
    };

    // 300 rows: two groups of at most 256, each one inline transaction.
    let usage: Vec<_> = (0..300)
        .map(|n| conformance::sample_usage("t", n))
        .collect();
    settle().await;
    let before = store.inline_counts();
    store.insert_usage(&usage).await.unwrap();
    settle().await;
    let events: Vec<BusEvent> = (0..3).map(event).collect();
    store
        .insert_events(&EventsRow::pack(&events))
        .await
        .unwrap();
    let after = store.inline_counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (3, 0),
        "two usage groups and one event group, inline"
    );
    let mut back = store.list_usage("t", 1000).await.unwrap();
    back.reverse();
    assert_eq!(back, usage, "every usage row, exactly");
    for e in &events {
        assert_eq!(
            store.list_trace_events("t", &e.trace_id).await.unwrap(),
            std::slice::from_ref(e)
        );
    }
    settle().await;
    store.insert_usage(&usage[..5]).await.unwrap();
    assert_eq!(
        store.count_usage("t").await.unwrap(),
        300,
        "a retried group adds nothing"
    );

    // Another process holds the write lock: the batch waits in the pool,
    // and is written once when the lock is free.
    let (other, mut lock) = hold_write_lock(&url).await;
    settle().await;
    let fallbacks = store.inline_counts().1;
    let more: Vec<_> = (300..310)
        .map(|n| conformance::sample_usage("t", n))
        .collect();
    let write = tokio::spawn({
        let store = store.clone();
        let more = more.clone();
        async move { store.insert_usage(&more).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the batch waits for the lock");
    assert_eq!(store.inline_counts().1, fallbacks + 1, "handed to the pool");
    sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
    write.await.unwrap().unwrap();
    assert_eq!(store.count_usage("t").await.unwrap(), 310);
    drop(lock);
    other.close().await;
    store.close().await;
}

#[tokio::test]
async fn sqlite_uses_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        url: format!("sqlite://{}/db.sqlite", dir.path().display()),
        ..StoreConfig::default()
    };
    let store = SqliteStore::connect(&config).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    assert!(dir.path().join("db.sqlite").exists());
    // The journal mode is persistent in the file header: reopen with raw sqlx.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}/db.sqlite", dir.path().display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

/// Under steady writes a checkpoint beside the writers never finds every
/// frame copied, so the WAL would never start again from its beginning; past
/// `sqlite_wal_limit_mb` the checkpointer finishes its copy in the writer's
/// turn, and the WAL file stays near the limit however much is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_under_continuous_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const LIMIT: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        url: format!("sqlite://{}/db.sqlite", dir.path().display()),
        // The test runs the rounds itself.
        sqlite_checkpoint_interval_ms: 86_400_000,
        sqlite_wal_limit_mb: 1,
        ..StoreConfig::default()
    };
    let store = Arc::new(SqliteStore::connect(&config).await.unwrap());
    store.migrate().await.unwrap();
    let wal = dir.path().join("db.sqlite-wal");
    // Two writers committing back to back, like the usage and trace-event
    // writers under load.
    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (store, stop, rows) = (store.clone(), stop.clone(), rows.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<_> = (0..64)
                        .map(|i| {
                            n += 1;
                            conformance::sample_usage(&format!("t{w}"), n * 64 + i)
                        })
                        .collect();
                    store.insert_usage(&batch).await.unwrap();
                    rows.fetch_add(64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Rounds until some 49 MB of WAL frames have been written in all.
    let (mut written, mut last, mut restarts, mut in_turn) = (0i64, 0i64, 0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while written + last < 12_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writers wrote too little in 90 s: {written} frames"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let round = store.checkpoint_now(LIMIT).await.unwrap();
        if round.frames < 0 {
            continue; // busy: another checkpoint was running
        }
        if round.frames < last {
            written += last;
            restarts += 1;
        }
        last = round.frames;
        if let Some((frames, copied)) = round.in_turn {
            in_turn += 1;
            // Nothing was written while it ran: every frame is copied.
            assert_eq!(frames, copied, "{round:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(rows.load(Ordering::Relaxed) > 0);
    // The bound works while the writers never stop: the WAL started again
    // from its beginning, again and again. Before the bound it never did,
    // and the file held all that was written.
    assert!(
        in_turn > 0 && restarts > 1,
        "in turn {in_turn}, restarts {restarts}"
    );
    // How far past the limit the file grows meanwhile depends on how long a
    // round's syncs take beside the writers, not on the bound (on loaded
    // machines it reached 27 % and 63 % of what was written, and once 96 MB
    // in under a second while one sync ran). What must hold is that once a
    // round has run, the next commit starts the WAL again and cuts the file
    // back to the limit (`journal_size_limit`).
    let round = store.checkpoint_now(LIMIT).await.unwrap();
    assert_eq!(round.frames, round.copied, "{round:?}");
    store
        .insert_usage(&[conformance::sample_usage("t-last", 1)])
        .await
        .unwrap();
    let after = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert!(
        after <= LIMIT,
        "the WAL file is {after} bytes after a round and a commit, limit {LIMIT}"
    );
    store.close().await;
}

pub fn pg_url() -> Option<String> {
    match std::env::var("SWITCHYARD_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("SWITCHYARD_REQUIRE_PG").as_deref() != Ok("1"),
                "SWITCHYARD_REQUIRE_PG=1 but SWITCHYARD_TEST_PG_URL is not set"
            );
            eprintln!("skipping: SWITCHYARD_TEST_PG_URL is not set");
            None
        }
    }
}

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let Some(url) = pg_url() else { return };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let config = StoreConfig {
        url,
        schema: Some(schema),
        ..StoreConfig::default()
    };
    let store = PostgresStore::connect(&config).await.unwrap();
    store.migrate().await.unwrap();
    conformance::run_all(&store).await;
    store.drop_schema().await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn postgres_migrations_serialize_across_concurrent_instances() {
    let Some(url) = pg_url() else { return };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let config = StoreConfig {
        url,
        schema: Some(schema),
        ..StoreConfig::default()
    };
    let a = PostgresStore::connect(&config).await.unwrap();
    let b = PostgresStore::connect(&config).await.unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        a.applied_migrations().await.unwrap(),
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    );
    a.drop_schema().await.unwrap();
}
