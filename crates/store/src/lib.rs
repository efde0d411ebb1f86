//! Persistence. [`Store`] is the one interface the engine uses; SQLite (the
//! embedded default, WAL mode) and PostgreSQL implement it and pass the same
//! [`conformance`] suite. Migrations are embedded in the binary and applied
//! at startup and by `switchyard migrate`.
//!
//! Every table carries `tenant_id` and every query filters by it.

#[cfg(feature = "conformance")]
pub mod conformance;
mod identity;
mod migrations;
mod postgres;
mod sessions;
mod sqlite;
mod sqlite_inline;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use switchyard_core::config::StoreConfig;
use switchyard_core::health::ProviderHealthRow;
use switchyard_core::identity::{ApiKeyRecord, AuditQuery, AuditRecord, Tenant};
use switchyard_core::sessions::{
    Bot, BusEvent, Erased, EventsRow, IdempotencyClaim, IdempotencyKey, Message, MessageCompletion,
    Session, SessionQuery, StatePatch, StoredResponse, UserData,
};
use switchyard_core::usage::UsageRecord;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The logs that grow with traffic, which retention trims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// `usage_logs`.
    Usage,
    /// `bus_events`.
    Events,
    /// `audit_logs`.
    Audit,
}

impl Log {
    /// The table's name.
    pub fn table(self) -> &'static str {
        match self {
            Log::Usage => "usage_logs",
            Log::Events => "bus_events",
            Log::Audit => "audit_logs",
        }
    }
}

/// The smallest UUIDv7, in its text form, of the millisecond `ms`: every
/// id made before `ms` sorts below it, every id made at or after it does not
/// (as text in lower case, and as PostgreSQL's `uuid`, byte by byte).
pub(crate) fn uuid_v7_floor(ms: i64) -> String {
    let ms = ms.clamp(0, (1 << 48) - 1);
    format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        ms >> 16,
        ms & 0xffff
    )
}

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

/// Most rows the background writers (usage, events) put in one
/// transaction: few commits under load, and a request that must write (a
/// reply storing its messages) waits behind one group at most.
pub(crate) const WRITE_GROUP: usize = 256;

/// The `provider_health` columns, in insert order (both backends).
pub(crate) const HEALTH_COLUMNS: &str = "deployment, provider, model, breaker_state, p50_ms, p95_ms, error_rate, \
     window_calls, total_calls, total_errors, last_error, last_error_at_ms, last_success_at_ms, last_probe_at_ms, \
     last_probe_ok, last_probe_ms, updated_at_ms";

/// `ON CONFLICT` clause replacing every column but the key.
pub(crate) fn health_upsert_clause() -> String {
    let sets: Vec<String> = HEALTH_COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| *c != "deployment")
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        " ON CONFLICT (deployment) DO UPDATE SET {}",
        sets.join(", ")
    )
}

/// Binds one health row's values in [`HEALTH_COLUMNS`] order.
macro_rules! push_health_row {
    ($b:expr, $r:expr) => {
        $b.push_bind(&$r.deployment)
            .push_bind(&$r.provider)
            .push_bind(&$r.model)
            .push_bind(&$r.breaker_state)
            .push_bind($r.p50_ms)
            .push_bind($r.p95_ms)
            .push_bind($r.error_rate)
            .push_bind($r.window_calls as i64)
            .push_bind($r.total_calls as i64)
            .push_bind($r.total_errors as i64)
            .push_bind(&$r.last_error)
            .push_bind($r.last_error_at_ms)
            .push_bind($r.last_success_at_ms)
            .push_bind($r.last_probe_at_ms)
            .push_bind($r.last_probe_ok)
            .push_bind($r.last_probe_ms)
            .push_bind($r.updated_at_ms)
    };
}
pub(crate) use push_health_row;

/// Reads one `provider_health` row (both backends share the column types).
pub(crate) fn health_from_row<R>(r: &R) -> Result<ProviderHealthRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> f64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<f64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<bool>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let count = |c: &str| -> Result<u64, sqlx::Error> { Ok(r.try_get::<i64, _>(c)?.max(0) as u64) };
    Ok(ProviderHealthRow {
        deployment: r.try_get("deployment")?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        breaker_state: r.try_get("breaker_state")?,
        p50_ms: r.try_get("p50_ms")?,
        p95_ms: r.try_get("p95_ms")?,
        error_rate: r.try_get("error_rate")?,
        window_calls: count("window_calls")?,
        total_calls: count("total_calls")?,
        total_errors: count("total_errors")?,
        last_error: r.try_get("last_error")?,
        last_error_at_ms: r.try_get("last_error_at_ms")?,
        last_success_at_ms: r.try_get("last_success_at_ms")?,
        last_probe_at_ms: r.try_get("last_probe_at_ms")?,
        last_probe_ok: r.try_get("last_probe_ok")?,
        last_probe_ms: r.try_get("last_probe_ms")?,
        updated_at_ms: r.try_get("updated_at_ms")?,
    })
}

pub(crate) trait Context<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database { context, source })
    }
}

/// Tenants, API keys and the audit log. Both backends implement it from one
/// body of SQL (`identity.rs`); it is part of every [`Store`].
#[async_trait]
pub trait IdentityStore: Send + Sync {
    /// Creates a tenant; `false` if one with that id exists.
    async fn create_tenant(&self, tenant: &Tenant) -> Result<bool, StoreError>;
    /// Sets a tenant's name, budget and limits to `after`'s if they are
    /// still `before`'s: `false` if the tenant does not exist or changed in
    /// between, so that two concurrent changes cannot undo each other.
    async fn update_tenant(&self, before: &Tenant, after: &Tenant) -> Result<bool, StoreError>;
    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    /// Records that a user exists in a tenant (idempotent).
    async fn ensure_user(
        &self,
        tenant_id: &str,
        user_id: &str,
        at_ms: i64,
    ) -> Result<(), StoreError>;
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// The key with this hash, in any tenant: the key itself says whose it is.
    async fn find_api_key_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError>;
    async fn get_api_key(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// A tenant's keys, revoked ones included, newest first.
    async fn list_api_keys(&self, tenant_id: &str) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Sets a key's name, role and limits to `after`'s if they are still
    /// `before`'s and the key is not revoked (matched by tenant and id):
    /// `false` otherwise, so that two concurrent changes cannot undo each
    /// other (a demotion reverted by a rename read before it).
    async fn update_api_key(
        &self,
        before: &ApiKeyRecord,
        after: &ApiKeyRecord,
    ) -> Result<bool, StoreError>;
    /// Marks a key revoked; `false` if it does not exist in this tenant or
    /// was already revoked.
    async fn revoke_api_key(
        &self,
        tenant_id: &str,
        id: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Keys ever created, revoked and expired ones included, across tenants:
    /// open development mode ends for good once there is one.
    async fn count_api_keys(&self) -> Result<u64, StoreError>;
    async fn insert_audit(&self, rows: &[AuditRecord]) -> Result<(), StoreError>;
    /// A tenant's audit events, newest first.
    async fn list_audit(
        &self,
        tenant_id: &str,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Bots, sessions and their messages, the events of each trace,
/// idempotency records and a user's data. Both backends implement it from
/// one body of SQL (`sessions.rs`); it is part of every [`Store`].
#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn insert_bot(&self, bot: &Bot) -> Result<(), StoreError>;
    async fn get_bot(&self, tenant_id: &str, id: &str) -> Result<Option<Bot>, StoreError>;
    /// A tenant's bots, newest first, below `before_id` when given.
    async fn list_bots(
        &self,
        tenant_id: &str,
        before_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Bot>, StoreError>;
    /// Replaces every field but the ids and `created_at_ms`; `false` if the
    /// bot does not exist in that tenant.
    async fn update_bot(&self, bot: &Bot) -> Result<bool, StoreError>;
    async fn delete_bot(&self, tenant_id: &str, id: &str) -> Result<bool, StoreError>;

    async fn insert_session(&self, session: &Session) -> Result<(), StoreError>;
    async fn get_session(&self, tenant_id: &str, id: &str) -> Result<Option<Session>, StoreError>;
    /// Newest first, filtered, below the cursor.
    async fn list_sessions(
        &self,
        tenant_id: &str,
        query: &SessionQuery,
    ) -> Result<Vec<Session>, StoreError>;
    /// Deletes a session with its messages; `false` if it does not exist.
    async fn delete_session(&self, tenant_id: &str, id: &str) -> Result<bool, StoreError>;
    /// Merges `patch` into the session's state (RFC 7396 JSON Merge Patch:
    /// objects merge recursively, `null` removes a key) and increments the
    /// version, in one statement; with `if_version`, only from that version.
    async fn patch_state(
        &self,
        tenant_id: &str,
        id: &str,
        patch: &Map<String, Value>,
        if_version: Option<i64>,
    ) -> Result<StatePatch, StoreError>;

    /// Inserts messages in one statement (a user turn and the assistant
    /// placeholder that answers it).
    async fn insert_messages(&self, rows: &[Message]) -> Result<(), StoreError>;
    async fn get_message(&self, tenant_id: &str, id: &str) -> Result<Option<Message>, StoreError>;
    /// A session's messages oldest first, after the cursor.
    async fn list_messages(
        &self,
        tenant_id: &str,
        session_id: &str,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;
    /// The turns worth sending a model as history, newest first, as
    /// `(role, content)`: user messages and complete replies, with content.
    /// The backend aggregates them into one row: this read is on the way
    /// to a reply's first token, and rows cost more than bytes.
    async fn history(
        &self,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError>;
    /// The session and its [`history`](Self::history) in one statement: a
    /// reply needs both before its first token, and one read is one trip to
    /// the database instead of two. `None` if the session does not exist
    /// for this tenant.
    async fn session_and_history(
        &self,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Result<Option<(Session, Vec<(String, String)>)>, StoreError>;
    /// Ends a `streaming` message; `false` if it is not streaming (already
    /// ended, or interrupted).
    async fn complete_message(&self, completion: &MessageCompletion) -> Result<bool, StoreError>;
    /// The frames stored with an ended message.
    async fn message_frames(&self, tenant_id: &str, id: &str)
        -> Result<Option<String>, StoreError>;
    /// Marks `streaming` messages `failed` with code `interrupted`: those of
    /// `instance_id`, and (across instances) those not updated since
    /// `stale_before_ms`. Returns how many.
    async fn interrupt_streaming(
        &self,
        instance_id: Option<&str>,
        stale_before_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<u64, StoreError>;

    /// Stores rows of trace events (one per trace and batch); a row whose
    /// first event is already stored is skipped, so a retried batch is safe.
    async fn insert_events(&self, rows: &[EventsRow]) -> Result<(), StoreError>;
    /// A trace's events in the order they happened.
    async fn list_trace_events(
        &self,
        tenant_id: &str,
        trace_id: &str,
    ) -> Result<Vec<BusEvent>, StoreError>;

    /// Claims an idempotency key, or reports who holds it. Expired records
    /// and in-flight claims past their lease are taken over.
    async fn claim_idempotency(&self, key: &IdempotencyKey)
        -> Result<IdempotencyClaim, StoreError>;
    /// Stores the response of a key claimed by `owner`, kept until
    /// `expires_at_ms`. Does nothing when the claim is no longer `owner`'s.
    async fn complete_idempotency(
        &self,
        tenant_id: &str,
        key: &str,
        owner: &str,
        response: &StoredResponse,
        expires_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// Gives up `owner`'s in-flight claim (the request failed in a way worth
    /// retrying). Does nothing when the claim is no longer `owner`'s.
    async fn release_idempotency(
        &self,
        tenant_id: &str,
        key: &str,
        owner: &str,
    ) -> Result<(), StoreError>;
    /// Deletes expired records; returns how many.
    async fn purge_idempotency(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Every session (with state), message and usage row of a user.
    async fn user_data(&self, tenant_id: &str, user_id: &str) -> Result<UserData, StoreError>;
    /// Deletes a user's sessions, messages, events and idempotency records,
    /// and removes the user from usage rows (kept for accounting), in one
    /// transaction.
    async fn erase_user(&self, tenant_id: &str, user_id: &str) -> Result<Erased, StoreError>;
}

#[async_trait]
pub trait Store: IdentityStore + SessionStore + Send + Sync + 'static {
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
    /// Inserts or replaces the health rows of these deployments.
    async fn upsert_provider_health(&self, rows: &[ProviderHealthRow]) -> Result<(), StoreError>;
    /// Every deployment's last persisted health, by deployment id.
    async fn list_provider_health(&self) -> Result<Vec<ProviderHealthRow>, StoreError>;

    /// Deletes at most `limit` rows of `log`, of every tenant, made before
    /// `before_ms`, oldest first; returns how many. Retention calls it until
    /// it returns less than `limit`, so that no one statement holds the
    /// writer for long.
    async fn purge_log(&self, log: Log, before_ms: i64, limit: u32) -> Result<u64, StoreError>;

    /// Total `cost_usd` of a tenant's usage (of one key, if given) since a time.
    async fn spend_since(
        &self,
        tenant_id: &str,
        key_id: Option<&str>,
        since_ms: i64,
    ) -> Result<f64, StoreError>;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uuid_v7_floor_splits_ids_at_their_millisecond() {
        let now = |()| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        let before = now(());
        let id = switchyard_core::usage::new_id();
        let after = now(());
        assert!(uuid_v7_floor(before) <= id, "{id}");
        assert!(id.as_str() < uuid_v7_floor(after + 1).as_str(), "{id}");
        assert_eq!(uuid_v7_floor(0), "00000000-0000-0000-0000-000000000000");
        assert_eq!(
            uuid_v7_floor(0x0123_4567_89ab),
            "01234567-89ab-0000-0000-000000000000"
        );
        assert_eq!(uuid_v7_floor(-5), uuid_v7_floor(0));
    }
}
