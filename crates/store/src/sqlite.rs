//! The embedded default: one SQLite file in WAL mode, so readers never wait
//! for the usage writer.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Executor, QueryBuilder, Row, SqlitePool};
use switchyard_core::config::StoreConfig;
use switchyard_core::health::ProviderHealthRow;
use switchyard_core::sessions::{EventsRow, Message, MessageCompletion};
use switchyard_core::usage::{PlainTrace, UsageRecord};

use crate::identity::lite_once;
use crate::migrations::{Migration, SQLITE};
use crate::sqlite_inline::{Attempt, Inline, WithHistory};
use crate::{
    health_from_row, health_upsert_clause, push_health_row, uuid_v7_floor, Context, Log, Store,
    StoreError, HEALTH_COLUMNS,
};

pub struct SqliteStore {
    /// Readers (WAL: they never wait for the writer).
    pool: SqlitePool,
    /// The one connection that writes. Writers queue here, woken as soon as
    /// the previous write ends, instead of in SQLite's busy handler, which
    /// sleeps 1, 2, 5, 10… ms between tries and would put those sleeps on
    /// the path of a reply's first token.
    writer: SqlitePool,
    /// A reply's read and write without the worker-thread round trips
    /// (see `sqlite_inline`); `None` for an in-memory database, which
    /// exists once per connection.
    inline: Option<Inline>,
    /// The connection the background checkpoints run on (none in memory).
    checkpointer: Option<SqlitePool>,
    /// The database file (empty in memory).
    db_path: std::path::PathBuf,
    /// The file `db_path` named when the store opened it (device, inode):
    /// the open connections keep a deleted or replaced file alive and keep
    /// answering, so `ping` checks that the path still names it.
    file_id: Option<(u64, u64)>,
}

/// The device and inode of the file at `path`.
#[cfg(unix)]
fn file_id(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl SqliteStore {
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let wal_limit = config.sqlite_wal_limit_mb.saturating_mul(1 << 20);
        let opts = SqliteConnectOptions::from_str(&config.url)
            .map_err(|e| StoreError::Config(format!("store.url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            // Multi-row inserts in a transaction keep a statement journal;
            // in memory it costs no file writes.
            .pragma("temp_store", "memory")
            // Checkpoints run from a background task (see `spawn_checkpoints`),
            // never inside a request's commit.
            .pragma("wal_autocheckpoint", "0")
            // When the WAL starts again from its beginning, its file is cut
            // back to this size.
            .pragma("journal_size_limit", wal_limit.to_string());
        let path = opts.get_filename().to_path_buf();
        let in_memory = path.as_os_str().is_empty() || path.to_string_lossy().contains(":memory:");
        if !in_memory {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| StoreError::Config(format!("creating {}: {e}", dir.display())))?;
            }
        }
        let pool = SqlitePoolOptions::new()
            // An in-memory database exists once per connection.
            .max_connections(if in_memory { 1 } else { config.max_connections })
            // sqlx pings a connection every time it is taken from the pool:
            // for SQLite, a round trip to the connection's worker thread that
            // can learn nothing (a file does not hang up), before every query
            // of a session reply and every writer batch.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(config.connect_timeout_secs))
            .connect_with(opts.clone())
            .await
            .context("opening the SQLite database")?;
        let one = || {
            SqlitePoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(config.connect_timeout_secs))
        };
        let (writer, checkpointer) = if in_memory {
            (pool.clone(), None)
        } else {
            let writer = one()
                .connect_with(opts.clone())
                .await
                .context("opening the SQLite database for writing")?;
            // Its own connection, without sqlx's slow-statement warning: a
            // PASSIVE checkpoint copies while writes go on, so under load it
            // runs for seconds by design (readers and writers never wait
            // for it), and a WARN line each time would be a false alarm.
            let checkpointer = one()
                .connect_with(opts.disable_statement_logging())
                .await
                .context("opening the SQLite database for checkpoints")?;
            Self::spawn_checkpoints(
                checkpointer.clone(),
                writer.clone(),
                path.clone(),
                Duration::from_millis(config.sqlite_checkpoint_interval_ms.max(1)),
                wal_limit,
            );
            (writer, Some(checkpointer))
        };
        let inline =
            (!in_memory).then(|| Inline::new(&path, config.max_connections as usize, wal_limit));
        #[cfg(unix)]
        let opened_file = match in_memory {
            true => None,
            false => Some(
                file_id(&path)
                    .map_err(|e| StoreError::Config(format!("reading {}: {e}", path.display())))?,
            ),
        };
        #[cfg(not(unix))]
        let opened_file = None;
        Ok(Self {
            pool,
            writer,
            inline,
            checkpointer,
            db_path: path,
            file_id: opened_file,
        })
    }

    /// Copies the WAL into the database now and then, off the request path:
    /// with automatic checkpoints, the commit that crosses the threshold
    /// (often a reply storing its messages) would do it and wait for it.
    fn spawn_checkpoints(
        pool: SqlitePool,
        writer: SqlitePool,
        db_path: std::path::PathBuf,
        every: Duration,
        wal_limit: u64,
    ) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut limit = None;
            loop {
                tick.tick().await;
                if pool.is_closed() || writer.is_closed() {
                    return;
                }
                let result = async {
                    let l = match limit {
                        Some(l) => l,
                        None => *limit.insert(limit_frames(&pool, wal_limit).await?),
                    };
                    checkpoint_round(&pool, &writer, &db_path, l).await
                }
                .await;
                if let Err(e) = result {
                    if pool.is_closed() || writer.is_closed() {
                        return;
                    }
                    tracing::warn!(error = %e, "SQLite checkpoint failed");
                }
            }
        });
    }

    async fn apply(&self, m: &Migration) -> Result<(), StoreError> {
        let err = |source| StoreError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        let mut conn = self
            .writer
            .acquire()
            .await
            .context("acquiring a connection")?;
        // IMMEDIATE takes the write lock first, so two processes migrating at
        // once serialize instead of both applying.
        (&mut *conn)
            .execute(sqlx::raw_sql("BEGIN IMMEDIATE"))
            .await
            .map_err(err)?;
        let result = async {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                    .bind(m.version)
                    .fetch_optional(&mut *conn)
                    .await?;
            if applied.is_none() {
                (&mut *conn).execute(sqlx::raw_sql(m.sql)).await?;
                sqlx::query(
                    "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?, ?, ?)",
                )
                .bind(m.version)
                .bind(m.name)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match result {
            Ok(()) => (&mut *conn)
                .execute(sqlx::raw_sql("COMMIT"))
                .await
                .map(|_| ())
                .map_err(err),
            Err(e) => {
                let _ = (&mut *conn).execute(sqlx::raw_sql("ROLLBACK")).await;
                Err(err(e))
            }
        }
    }
}

/// Rows per usage INSERT statement, largest first; the last must be 1.
const USAGE_CHUNKS: [usize; 4] = [64, 16, 4, 1];

fn usage_insert_sql() -> &'static [String; 4] {
    static SQL: std::sync::OnceLock<[String; 4]> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        USAGE_CHUNKS.map(|n| {
            let row = format!("({})", vec!["?"; 21].join(", "));
            format!(
                "INSERT INTO usage_logs (id, tenant_id, key_id, user_id, trace_id, endpoint, model_alias, provider, upstream_model, stream, \
                 prompt_tokens, completion_tokens, cost_usd, latency_ms, ttft_ms, status, error_code, created_at_ms, trace_ms, \
                 cached_tokens, cache_write_tokens) VALUES {} \
                 ON CONFLICT (id) DO NOTHING",
                vec![row; n].join(", ")
            )
        })
    })
}

/// The one-row usage INSERT (the last of the chunk sizes), for the
/// inline writer.
pub(crate) fn usage_insert_one() -> &'static str {
    const LAST: usize = USAGE_CHUNKS.len() - 1;
    const _: () = assert!(USAGE_CHUNKS[LAST] == 1);
    usage_insert_sql()[LAST].as_str()
}

/// What one checkpoint round found and did, in WAL frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointRound {
    /// Frames in the WAL, and how many of them are in the database now.
    pub frames: i64,
    pub copied: i64,
    /// The same after the second checkpoint, in the writer's turn, when the
    /// WAL had grown past its limit.
    pub in_turn: Option<(i64, i64)>,
}

/// One checkpoint round. A PASSIVE checkpoint copies the WAL while writes go
/// on, and a write may start the WAL again from its beginning only once
/// every frame is in the database. Under steady load a commit always lands
/// while the copy runs, so that moment never comes and the WAL grows without
/// end (~10 MB a second with one client, `docs/BENCHMARKS.md`). So when the
/// WAL is past `wal_limit` bytes, a second checkpoint runs holding the
/// writer's one connection, through which every write of this process goes:
/// it copies only what came during the first, nothing can land meanwhile,
/// and the next commit starts the WAL again (its file cut back to the limit
/// by `journal_size_limit`). The bound is best-effort: a read that is still
/// open keeps the frames after its snapshot (and the restart) for the next
/// round, and another process's writes do not take this turn.
pub(crate) async fn checkpoint_round(
    pool: &SqlitePool,
    writer: &SqlitePool,
    db_path: &std::path::Path,
    limit_frames: i64,
) -> Result<CheckpointRound, sqlx::Error> {
    let started = std::time::Instant::now();
    let (frames, copied) = checkpoint(pool).await?;
    if started.elapsed() >= Duration::from_secs(1) {
        tracing::debug!(
            frames,
            copied,
            ms = started.elapsed().as_millis() as u64,
            "a PASSIVE SQLite checkpoint ran long (it waits for no one)"
        );
    }
    let mut round = CheckpointRound {
        frames,
        copied,
        in_turn: None,
    };
    if frames <= limit_frames {
        return Ok(round);
    }
    // A checkpoint that leaves frames behind does not sync the database
    // file; the one that copies the last frame syncs everything copied since
    // the WAL last started (tens of MB, ~0.1 s on this project's disk). Done
    // here, beside the writers, the second checkpoint's sync below has only
    // its own few pages left to flush while it holds the writer.
    let started = std::time::Instant::now();
    sync_file(db_path).await?;
    checkpoint(pool).await?;
    sync_file(db_path).await?;
    let before = started.elapsed();
    let mut turn = writer.acquire().await?;
    let waited = started.elapsed() - before;
    let in_turn = checkpoint(&mut *turn).await?;
    drop(turn);
    round.in_turn = Some(in_turn);
    tracing::debug!(
        frames = in_turn.0,
        copied = in_turn.1,
        beside_us = before.as_micros() as u64,
        waited_us = waited.as_micros() as u64,
        held_us = (started.elapsed() - before - waited).as_micros() as u64,
        "SQLite checkpoint finished in the writer's turn"
    );
    Ok(round)
}

/// How many WAL frames make `wal_limit` bytes: a frame is a page and its
/// 24-byte header (the page size is the file's, read once).
async fn limit_frames(pool: &SqlitePool, wal_limit: u64) -> Result<i64, sqlx::Error> {
    let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(pool)
        .await?;
    Ok(i64::try_from(wal_limit).unwrap_or(i64::MAX) / (page_size.max(512) + 24))
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: (frames in the WAL, frames copied).
async fn checkpoint<'c>(
    conn: impl sqlx::Executor<'c, Database = sqlx::Sqlite>,
) -> Result<(i64, i64), sqlx::Error> {
    let (_, frames, copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(conn)
        .await?;
    Ok((frames, copied))
}

/// Flushes a file's written pages to the disk, on a blocking thread.
async fn sync_file(path: &std::path::Path) -> Result<(), sqlx::Error> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(path)?.sync_data())
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?
        .map_err(sqlx::Error::Io)
}

impl SqliteStore {
    /// One checkpoint round now, as the background task runs it (for tests).
    #[doc(hidden)]
    pub async fn checkpoint_now(&self, wal_limit: u64) -> Result<CheckpointRound, StoreError> {
        async {
            let limit = limit_frames(&self.pool, wal_limit).await?;
            checkpoint_round(&self.pool, &self.writer, &self.db_path, limit).await
        }
        .await
        .context("checkpointing the WAL")
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

/// Total spend of a tenant (or one of its keys) since a time.
const SPEND_SQL: &str = "SELECT SUM(cost_usd) FROM usage_logs WHERE tenant_id = ? AND (? IS NULL OR key_id = ?) AND created_at_ms >= ?";

/// The `usage_logs` columns of a [`UsageRecord`], for SELECT.
const USAGE_SELECT: &str = "id, tenant_id, key_id, user_id, trace_id, endpoint, model_alias, provider, upstream_model, stream, \
     prompt_tokens, completion_tokens, cost_usd, latency_ms, ttft_ms, status, error_code, created_at_ms, trace_ms, \
     cached_tokens, cache_write_tokens";

fn usage_from_row(r: &SqliteRow) -> Result<UsageRecord, sqlx::Error> {
    Ok(UsageRecord {
        id: r.try_get("id")?,
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
        status: u16::try_from(r.try_get::<i64, _>("status")?).unwrap_or(0),
        error_code: r.try_get("error_code")?,
        created_at_ms: r.try_get("created_at_ms")?,
        trace: r
            .try_get::<Option<String>, _>("trace_ms")?
            .as_deref()
            .and_then(PlainTrace::decode),
    })
}

crate::sessions::usage_reads!(SqliteStore, lite_once, "created_at_ms");

crate::identity::identity_store!(SqliteStore, lite_once);
crate::sessions::session_store!(
    SqliteStore,
    lite_once,
    "json_patch(state, ?)",
    "SELECT json_group_array(json_array(id, role, content)) FROM (SELECT id, role, content \
     FROM messages WHERE tenant_id = ? AND session_id = ? \
     AND (role = 'user' OR status = 'complete') AND content <> '' ORDER BY id DESC LIMIT ?)"
);

/// The fast paths `session_store!` tries first (`None`: take the sqlx path).
impl SqliteStore {
    fn fast_session_and_history(
        &self,
        sql: &str,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Attempt<Option<WithHistory>> {
        self.inline
            .as_ref()?
            .session_and_history(sql, tenant_id, session_id, limit)
    }

    fn fast_insert_messages(&self, rows: &[Message]) -> Attempt<()> {
        self.inline.as_ref()?.insert_messages(&self.writer, rows)
    }

    fn fast_complete_message(&self, sql: &str, c: &MessageCompletion) -> Attempt<bool> {
        self.inline.as_ref()?.complete_message(&self.writer, sql, c)
    }

    async fn fast_insert_events(&self, rows: &[EventsRow]) -> Attempt<()> {
        self.inline_batch(|i| i.insert_events(rows)).await
    }

    /// A writer batch's group, inline, in the sqlx writer's turn: a
    /// background batch waits for it like the sqlx path would (a reply's
    /// statement does not, see `Inline::write`).
    async fn inline_batch(&self, f: impl FnOnce(&Inline) -> Attempt<()>) -> Attempt<()> {
        let inline = self.inline.as_ref()?;
        // An error here is the sqlx path's to report.
        let _turn = self.writer.acquire().await.ok()?;
        f(inline)
    }

    /// How many statements took the inline path and how many were handed
    /// back to sqlx (for tests).
    #[doc(hidden)]
    pub fn inline_counts(&self) -> (u64, u64) {
        self.inline.as_ref().map_or((0, 0), Inline::counts)
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ms INTEGER NOT NULL)",
        )
        .execute(&self.writer)
        .await
        .context("creating schema_migrations")?;
        for m in SQLITE {
            self.apply(m).await?;
        }
        Ok(())
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
        #[cfg(unix)]
        if let Some(opened) = self.file_id {
            let path = self.db_path.clone();
            let now = tokio::task::spawn_blocking(move || file_id(&path))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
            let gone = match now {
                Ok(id) if id == opened => None,
                Ok(_) => Some("the database file was replaced since it was opened"),
                Err(_) => Some("the database file is no longer at its path"),
            };
            if let Some(why) = gone {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    why,
                )))
                .context("pinging");
            }
        }
        Ok(())
    }

    async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Multi-row INSERTs of a few fixed sizes, so every statement is one of
        // four cached prepared statements (a statement per batch size would
        // fill sqlx's statement cache and memory), and a batch costs a handful
        // of round trips to the SQLite thread instead of one per row.
        // At most WRITE_GROUP rows per transaction: few commits under load,
        // and a reply storing its messages waits for one group at most, not
        // the whole batch. `ON CONFLICT DO NOTHING` makes a retried batch safe.
        // A group goes inline when the writer is free (see `sqlite_inline`).
        for group in rows.chunks(crate::WRITE_GROUP) {
            if let Some(done) = self.inline_batch(|i| i.insert_usage(group)).await {
                done?;
                continue;
            }
            let mut tx = self
                .writer
                .begin()
                .await
                .context("starting the usage transaction")?;
            let mut rest = group;
            for (size, sql) in USAGE_CHUNKS.iter().zip(usage_insert_sql()) {
                while rest.len() >= *size {
                    let (chunk, tail) = rest.split_at(*size);
                    rest = tail;
                    let mut q = sqlx::query(sql.as_str());
                    for r in chunk {
                        q = q
                            .bind(&r.id)
                            .bind(&r.tenant_id)
                            .bind(&r.key_id)
                            .bind(&r.user_id)
                            .bind(&r.trace_id)
                            .bind(&r.endpoint)
                            .bind(&r.model_alias)
                            .bind(&r.provider)
                            .bind(&r.upstream_model)
                            .bind(r.stream)
                            .bind(crate::sessions::db_int(r.prompt_tokens))
                            .bind(crate::sessions::db_int(r.completion_tokens))
                            .bind(r.cost_usd)
                            .bind(r.latency_ms)
                            .bind(r.ttft_ms)
                            .bind(i64::from(r.status))
                            .bind(&r.error_code)
                            .bind(r.created_at_ms)
                            .bind(r.trace.map(|t| t.encode()))
                            .bind(crate::sessions::db_int(r.cached_tokens))
                            .bind(crate::sessions::db_int(r.cache_write_tokens));
                    }
                    q.execute(&mut *tx).await.context("inserting usage rows")?;
                }
            }
            tx.commit().await.context("committing usage rows")?;
        }
        Ok(())
    }

    async fn list_usage(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(lite_once!(format!(
            "SELECT {USAGE_SELECT} FROM usage_logs WHERE tenant_id = ? ORDER BY created_at_ms DESC, id DESC LIMIT ?"
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
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_logs WHERE tenant_id = ?")
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
        let q = match log {
            // The primary key's index, in id order, which is time order.
            Log::Usage => sqlx::query(
                "DELETE FROM usage_logs WHERE id IN (SELECT id FROM usage_logs \
                 WHERE id < ? AND created_at_ms < ? ORDER BY id LIMIT ?)",
            )
            .bind(uuid_v7_floor(before_ms)),
            Log::Events => sqlx::query(
                "DELETE FROM bus_events WHERE rowid IN (SELECT rowid FROM bus_events \
                 WHERE created_at_ms < ? ORDER BY created_at_ms LIMIT ?)",
            ),
            Log::Audit => sqlx::query(
                "DELETE FROM audit_logs WHERE id IN (SELECT id FROM audit_logs \
                 WHERE created_at_ms < ? ORDER BY created_at_ms LIMIT ?)",
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
        if let Some(inline) = &self.inline {
            let (inline, pool) = inline.counts();
            tracing::info!(
                inline,
                pool,
                "SQLite statements (replies) and transactions (writer batches) run inline / through the pool"
            );
        }
        // Closed, not waited for: a PASSIVE checkpoint under way can run for
        // seconds, and one cut short by the exit loses nothing (every frame
        // stays in the WAL, which the next open checkpoints again).
        if let Some(c) = &self.checkpointer {
            drop(c.close());
        }
        self.writer.close().await;
        self.pool.close().await;
    }
}
