//! PostgreSQL, for running many instances on one database. An optional
//! `store.schema` puts every table in its own schema (tests use a fresh one
//! each and drop it afterwards).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Executor, PgPool, QueryBuilder, Row};
use switchyard_core::config::StoreConfig;
use switchyard_core::health::ProviderHealthRow;
use switchyard_core::usage::{PlainTrace, UsageRecord};

use crate::identity::pg_once;
use crate::migrations::POSTGRES;
use crate::{
    health_from_row, health_upsert_clause, push_health_row, uuid_v7_floor, Context, Log, Store,
    StoreError, HEALTH_COLUMNS,
};

/// Key of the advisory lock that serializes migrations across instances.
const MIGRATION_LOCK: i64 = 0x5357_4954_4348; // "SWITCH"

pub struct PostgresStore {
    pool: PgPool,
    /// The same pool: PostgreSQL has row locks and no single writer, so
    /// writes need no queue of their own (the SQL shared with SQLite names it).
    writer: PgPool,
    schema: Option<String>,
}

impl PostgresStore {
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let mut opts = PgConnectOptions::from_str(&config.url)
            .map_err(|e| {
                StoreError::Config(format!(
                    "store.url: {}",
                    redact(&e.to_string(), &config.url)
                ))
            })?
            .application_name("switchyard");
        if let Some(schema) = &config.schema {
            // validate() allows only identifier characters, so this cannot inject.
            opts = opts.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(config.connect_timeout_secs))
            .connect_with(opts)
            .await
            .context("connecting to PostgreSQL")?;
        Ok(Self {
            writer: pool.clone(),
            pool,
            schema: config.schema.clone(),
        })
    }

    /// Drops the configured schema and everything in it (tests only).
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        if let Some(schema) = &self.schema {
            sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(&self.writer)
                .await
                .context("dropping the schema")?;
        }
        Ok(())
    }
}

fn redact(message: &str, url: &str) -> String {
    let masked = switchyard_core::config::mask_url_password(url);
    message.replace(url, &masked)
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

/// Total spend of a tenant (or one of its keys) since a time.
const SPEND_SQL: &str = "SELECT SUM(cost_usd)::float8 FROM usage_logs WHERE tenant_id = $1 AND ($2::text IS NULL OR key_id = $3) AND created_at >= to_timestamp($4 / 1000.0)";

/// The `usage_logs` columns of a [`UsageRecord`], for SELECT.
const USAGE_SELECT: &str = "id, tenant_id, key_id, user_id, trace_id, endpoint, model_alias, provider, upstream_model, stream, \
     prompt_tokens, completion_tokens, cost_usd, latency_ms, ttft_ms, status, error_code, \
     (extract(epoch FROM created_at) * 1000)::float8 AS created_at_ms, trace_ms, cached_tokens, cache_write_tokens";

fn usage_from_row(r: &PgRow) -> Result<UsageRecord, sqlx::Error> {
    Ok(UsageRecord {
        id: r.try_get::<uuid::Uuid, _>("id")?.to_string(),
        tenant_id: r.try_get("tenant_id")?,
        key_id: r.try_get("key_id")?,
        user_id: r.try_get("user_id")?,
        trace_id: r.try_get("trace_id")?,
        endpoint: r.try_get("endpoint")?,
        model_alias: r.try_get("model_alias")?,
        provider: r.try_get("provider")?,
        upstream_model: r.try_get("upstream_model")?,
        stream: r.try_get("stream")?,
        prompt_tokens: opt_u64(r.try_get("prompt_tokens")?),
        completion_tokens: opt_u64(r.try_get("completion_tokens")?),
        cached_tokens: opt_u64(r.try_get("cached_tokens")?),
        cache_write_tokens: opt_u64(r.try_get("cache_write_tokens")?),
        cost_usd: r.try_get("cost_usd")?,
        latency_ms: r.try_get("latency_ms")?,
        ttft_ms: r.try_get("ttft_ms")?,
        status: u16::try_from(r.try_get::<i32, _>("status")?).unwrap_or(0),
        error_code: r.try_get("error_code")?,
        created_at_ms: r.try_get::<f64, _>("created_at_ms")?.round() as i64,
        trace: r
            .try_get::<Option<String>, _>("trace_ms")?
            .as_deref()
            .and_then(PlainTrace::decode),
    })
}

crate::sessions::usage_reads!(PostgresStore, pg_once, "created_at");

crate::identity::identity_store!(PostgresStore, pg_once);
crate::sessions::session_store!(
    PostgresStore,
    pg_once,
    "sy_json_merge_patch(state::jsonb, ?::jsonb)::text",
    "SELECT COALESCE(json_agg(json_build_array(id, role, content)), '[]')::text FROM (SELECT id, role, content \
     FROM messages WHERE tenant_id = ? AND session_id = ? \
     AND (role = 'user' OR status = 'complete') AND content <> '' ORDER BY id DESC LIMIT ?) AS h"
);

/// `session_store!`'s fast paths: none for PostgreSQL, a server reached
/// over a socket either way.
impl PostgresStore {
    fn fast_session_and_history(
        &self,
        _sql: &str,
        _tenant_id: &str,
        _session_id: &str,
        _limit: u32,
    ) -> crate::sqlite_inline::Attempt<Option<crate::sqlite_inline::WithHistory>> {
        None
    }

    fn fast_insert_messages(
        &self,
        _rows: &[switchyard_core::sessions::Message],
    ) -> crate::sqlite_inline::Attempt<()> {
        None
    }

    fn fast_complete_message(
        &self,
        _sql: &str,
        _c: &switchyard_core::sessions::MessageCompletion,
    ) -> crate::sqlite_inline::Attempt<bool> {
        None
    }

    async fn fast_insert_events(
        &self,
        _rows: &[switchyard_core::sessions::EventsRow],
    ) -> crate::sqlite_inline::Attempt<()> {
        None
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting the migration transaction")?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .context("taking the migration lock")?;
        if let Some(schema) = &self.schema {
            (&mut *tx)
                .execute(sqlx::raw_sql(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
                )))
                .await
                .context("creating the schema")?;
        }
        (&mut *tx)
            .execute(sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            ))
            .await
        .context("creating schema_migrations")?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all(&mut *tx)
            .await
            .context("listing migrations")?;
        for m in POSTGRES.iter().filter(|m| !applied.contains(&m.version)) {
            let err = |source| StoreError::Migration {
                version: m.version,
                name: m.name,
                source,
            };
            (&mut *tx)
                .execute(sqlx::raw_sql(m.sql))
                .await
                .map_err(err)?;
            sqlx::query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)")
                .bind(m.version)
                .bind(m.name)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.context("committing migrations")
    }

    async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&self.pool)
            .await
            .context("listing migrations")
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.writer)
            .await
            .context("pinging")?;
        Ok(())
    }

    async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        // One statement text for any batch size (arrays + UNNEST), so it is
        // prepared once and cached, and one round trip per batch.
        let ids = rows
            .iter()
            .map(|r| {
                uuid::Uuid::parse_str(&r.id)
                    .map_err(|e| StoreError::Corrupt(format!("usage id {}: {e}", r.id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let col = |f: fn(&UsageRecord) -> String| rows.iter().map(f).collect::<Vec<String>>();
        sqlx::query(
            "INSERT INTO usage_logs (id, tenant_id, trace_id, endpoint, model_alias, provider, upstream_model, stream, \
             prompt_tokens, completion_tokens, cost_usd, latency_ms, ttft_ms, status, error_code, created_at, key_id, user_id, trace_ms, \
             cached_tokens, cache_write_tokens) \
             SELECT id, tenant_id, trace_id, endpoint, model_alias, provider, upstream_model, stream, prompt_tokens, \
             completion_tokens, cost_usd, latency_ms, ttft_ms, status, error_code, to_timestamp(created_at_ms / 1000.0), key_id, user_id, trace_ms, \
             cached_tokens, cache_write_tokens \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bool[], \
             $9::int8[], $10::int8[], $11::float8[], $12::float8[], $13::float8[], $14::int4[], $15::text[], $16::int8[], \
             $17::text[], $18::text[], $19::text[], $20::int8[], $21::int8[]) \
             AS t(id, tenant_id, trace_id, endpoint, model_alias, provider, upstream_model, stream, prompt_tokens, \
             completion_tokens, cost_usd, latency_ms, ttft_ms, status, error_code, created_at_ms, key_id, user_id, trace_ms, \
             cached_tokens, cache_write_tokens) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(ids)
        .bind(col(|r| r.tenant_id.clone()))
        .bind(col(|r| r.trace_id.clone()))
        .bind(col(|r| r.endpoint.clone()))
        .bind(col(|r| r.model_alias.clone()))
        .bind(col(|r| r.provider.clone()))
        .bind(col(|r| r.upstream_model.clone()))
        .bind(rows.iter().map(|r| r.stream).collect::<Vec<bool>>())
        .bind(rows.iter().map(|r| crate::sessions::db_int(r.prompt_tokens)).collect::<Vec<Option<i64>>>())
        .bind(rows.iter().map(|r| crate::sessions::db_int(r.completion_tokens)).collect::<Vec<Option<i64>>>())
        .bind(rows.iter().map(|r| r.cost_usd).collect::<Vec<Option<f64>>>())
        .bind(rows.iter().map(|r| r.latency_ms).collect::<Vec<f64>>())
        .bind(rows.iter().map(|r| r.ttft_ms).collect::<Vec<Option<f64>>>())
        .bind(rows.iter().map(|r| i32::from(r.status)).collect::<Vec<i32>>())
        .bind(rows.iter().map(|r| r.error_code.clone()).collect::<Vec<Option<String>>>())
        .bind(rows.iter().map(|r| r.created_at_ms).collect::<Vec<i64>>())
        .bind(rows.iter().map(|r| r.key_id.clone()).collect::<Vec<Option<String>>>())
        .bind(rows.iter().map(|r| r.user_id.clone()).collect::<Vec<Option<String>>>())
        .bind(rows.iter().map(|r| r.trace.map(|t| t.encode())).collect::<Vec<Option<String>>>())
        .bind(rows.iter().map(|r| crate::sessions::db_int(r.cached_tokens)).collect::<Vec<Option<i64>>>())
        .bind(rows.iter().map(|r| crate::sessions::db_int(r.cache_write_tokens)).collect::<Vec<Option<i64>>>())
        .execute(&self.writer)
        .await
        .context("inserting usage rows")?;
        Ok(())
    }

    async fn list_usage(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(pg_once!(format!(
            "SELECT {USAGE_SELECT} FROM usage_logs WHERE tenant_id = ? ORDER BY created_at DESC, id DESC LIMIT ?"
        )))
        .bind(tenant_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .context("listing usage rows")?;
        rows.iter()
            .map(usage_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .context("reading usage rows")
    }

    async fn count_usage(&self, tenant_id: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_logs WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_one(&self.pool)
            .await
            .context("counting usage rows")?;
        Ok(n.max(0) as u64)
    }

    async fn upsert_provider_health(&self, rows: &[ProviderHealthRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut qb = QueryBuilder::new(format!("INSERT INTO provider_health ({HEALTH_COLUMNS}) "));
        qb.push_values(rows, |mut b, r| {
            push_health_row!(b, r);
        });
        qb.push(health_upsert_clause());
        qb.build()
            .execute(&self.writer)
            .await
            .context("writing provider health")?;
        Ok(())
    }

    async fn list_provider_health(&self) -> Result<Vec<ProviderHealthRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {HEALTH_COLUMNS} FROM provider_health ORDER BY deployment"
        ))
        .fetch_all(&self.pool)
        .await
        .context("listing provider health")?;
        rows.iter()
            .map(health_from_row)
            .collect::<Result<_, _>>()
            .context("reading provider health")
    }

    async fn purge_log(&self, log: Log, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let limit = i64::from(limit);
        // SKIP LOCKED: instances trimming at the same time take different
        // rows instead of queueing on each other's.
        let q = match log {
            // The primary key's index, in id order, which is time order.
            Log::Usage => sqlx::query(
                "DELETE FROM usage_logs WHERE id IN (SELECT id FROM usage_logs \
                 WHERE id < $1::uuid AND created_at < to_timestamp($2::bigint / 1000.0) \
                 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)",
            )
            .bind(uuid_v7_floor(before_ms)),
            // No key of its own: the rows' physical addresses.
            Log::Events => sqlx::query(
                "DELETE FROM bus_events WHERE ctid = ANY(ARRAY(SELECT ctid FROM bus_events \
                 WHERE created_at_ms < $1 ORDER BY created_at_ms LIMIT $2 \
                 FOR UPDATE SKIP LOCKED))",
            ),
            Log::Audit => sqlx::query(
                "DELETE FROM audit_logs WHERE id IN (SELECT id FROM audit_logs \
                 WHERE created_at_ms < $1 ORDER BY created_at_ms LIMIT $2 \
                 FOR UPDATE SKIP LOCKED)",
            ),
        };
        let r = q
            .bind(before_ms)
            .bind(limit)
            .execute(&self.writer)
            .await
            .context("deleting old log rows")?;
        Ok(r.rows_affected())
    }

    async fn spend_since(
        &self,
        tenant_id: &str,
        key_id: Option<&str>,
        since_ms: i64,
    ) -> Result<f64, StoreError> {
        let sql = SPEND_SQL;
        let spent: Option<f64> = sqlx::query_scalar(sql)
            .bind(tenant_id)
            .bind(key_id)
            .bind(key_id)
            .bind(since_ms)
            .fetch_one(&self.pool)
            .await
            .context("summing spend")?;
        Ok(spent.unwrap_or(0.0))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
