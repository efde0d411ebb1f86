//! Persistence. [`Store`] is the one interface the engine uses; SQLite (the
//! embedded default, WAL mode) and PostgreSQL implement it and pass the same
//! [`conformance`] suite. Migrations are embedded in the binary and applied
//! at startup and by `switchyard migrate`.
//!
//! Every table carries `tenant_id` and every query filters by it.

pub mod conformance;
mod migrations;
mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use switchyard_core::config::StoreConfig;
use switchyard_core::usage::UsageRecord;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("database error while {context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
}

pub(crate) trait Context<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database { context, source })
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Applies the embedded migrations not yet applied; safe to run
    /// concurrently from several instances.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Versions of the migrations applied, ascending.
    async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError>;
    /// Cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Writes a batch of usage rows in one transaction.
    async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError>;
    /// A tenant's newest usage rows first.
    async fn list_usage(&self, tenant_id: &str, limit: u32)
        -> Result<Vec<UsageRecord>, StoreError>;
    async fn count_usage(&self, tenant_id: &str) -> Result<u64, StoreError>;
    /// Closes the pool, waiting for connections in use.
    async fn close(&self);
}

/// Opens the store the configuration names (without migrating it).
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    if config.url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(config).await?))
    } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(config).await?))
    } else {
        Err(StoreError::Config(format!(
            "store.url must start with sqlite: or postgres://, got {}",
            switchyard_core::config::mask_url_password(&config.url)
        )))
    }
}
