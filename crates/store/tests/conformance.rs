//! Runs the shared conformance suite against SQLite (always) and PostgreSQL
//! (when `SWITCHYARD_TEST_PG_URL` is set; `SWITCHYARD_REQUIRE_PG=1` makes its
//! absence a failure, as CI does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use switchyard_core::config::StoreConfig;
use switchyard_store::{conformance, PostgresStore, SqliteStore, Store};

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
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    a.drop_schema().await.unwrap();
}
