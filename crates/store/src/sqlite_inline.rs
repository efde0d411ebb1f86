//! The two statements on the way to a session reply's first token — the
//! read of the session with its history, and the write of the user message
//! with the assistant placeholder — and the one that completes the reply
//! before its last frame run on the request's own thread.
//!
//! Through sqlx every SQLite statement is a round trip to the connection's
//! worker thread (the command, then the answer: two wake-ups, each of which
//! may cross CPUs), and returning the connection to its pool pings it, one
//! more round trip. A reply made two such statements before calling the
//! provider, and one more to complete it. SQLite is a library: a statement
//! on a page-cached file takes tens of microseconds, less than the wake-ups
//! around it, so these run inline through `rusqlite` on connections of
//! their own (the same `libsqlite3-sys`, so the same SQLite).
//!
//! Nothing here waits: readers never wait in WAL mode; the write first
//! takes the sqlx writer's one connection with `try_acquire` (so no other
//! write of this process can run meanwhile) and its connection has no busy
//! timeout. Whenever anything is not free at once — the writer is busy,
//! another process holds the write lock, a connection cannot be opened —
//! or a statement fails, the caller falls back to the sqlx path, which
//! queues, waits and reports errors as before. A statement that fails has
//! changed nothing (each is one autocommit statement), so running it again
//! there is safe.
//!
//! The usage and trace-event writers' batches take the same writer, one
//! transaction per group of rows, row by row through one prepared statement,
//! without the sqlx worker's round trip per statement and its copies of
//! every bound value. A batch is background work, so unlike a reply's
//! statement it waits for the sqlx writer's connection (its caller holds
//! it). A group that fails is rolled back and written by the sqlx path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use sqlx::SqlitePool;
use switchyard_core::sessions::{EventsRow, Message, MessageCompletion, Session};
use switchyard_core::usage::UsageRecord;

use crate::identity::RowExt;
use crate::sessions::{
    db_int, history_from_text, insert_events_sql, session_from_row, MESSAGE_COLUMNS,
};
use crate::StoreError;

/// The per-connection pragmas the sqlx connections are opened with.
fn pragmas(wal_limit: u64) -> String {
    format!(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA temp_store = memory; \
         PRAGMA journal_size_limit = {wal_limit};"
    )
}

pub(crate) struct Inline {
    path: PathBuf,
    pragmas: String,
    /// Idle reader connections; at most `max_readers` exist.
    readers: Mutex<Vec<Connection>>,
    max_readers: usize,
    opened_readers: AtomicU64,
    writer: Mutex<Option<Connection>>,
    /// Statements run here, and statements handed back to the sqlx path.
    hits: AtomicU64,
    fallbacks: AtomicU64,
}

/// What a fast path returns: `None` means "use the sqlx path".
pub(crate) type Attempt<T> = Option<Result<T, StoreError>>;

/// A session with its history, newest turn first, as `(role, content)`.
pub(crate) type WithHistory = (Session, Vec<(String, String)>);

impl Inline {
    pub(crate) fn new(path: &Path, max_readers: usize, wal_limit: u64) -> Self {
        Self {
            path: path.to_path_buf(),
            pragmas: pragmas(wal_limit),
            readers: Mutex::new(Vec::new()),
            max_readers: max_readers.max(1),
            opened_readers: AtomicU64::new(0),
            writer: Mutex::new(None),
            hits: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// (statements run inline, statements handed to the sqlx path).
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.fallbacks.load(Ordering::Relaxed),
        )
    }

    fn open(&self, read_only: bool) -> rusqlite::Result<Connection> {
        let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX;
        flags |= if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        };
        let conn = Connection::open_with_flags(&self.path, flags)?;
        // No busy handler: a lock that is not free sends the statement to
        // the sqlx path instead of sleeping on this thread.
        conn.busy_timeout(std::time::Duration::ZERO)?;
        conn.execute_batch(&self.pragmas)?;
        Ok(conn)
    }

    fn outcome<T>(&self, what: &str, r: rusqlite::Result<T>) -> Option<T> {
        match r {
            Ok(v) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "inline SQLite {what} handed to the pool");
                None
            }
        }
    }

    fn read<T>(&self, what: &str, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<T> {
        let idle = self.readers.lock().ok()?.pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                if self.opened_readers.fetch_add(1, Ordering::Relaxed) >= self.max_readers as u64 {
                    self.opened_readers.fetch_sub(1, Ordering::Relaxed);
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                match self.open(true) {
                    Ok(c) => c,
                    Err(e) => {
                        self.opened_readers.fetch_sub(1, Ordering::Relaxed);
                        return self.outcome(what, Err(e));
                    }
                }
            }
        };
        let r = f(&conn);
        if let Ok(mut idle) = self.readers.lock() {
            idle.push(conn);
        }
        self.outcome(what, r)
    }

    fn write<T>(
        &self,
        sqlx_writer: &SqlitePool,
        what: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        // Holding the sqlx writer's only connection keeps this process's
        // other writes out until the statement is done.
        let Some(_turn) = sqlx_writer.try_acquire() else {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.write_in_turn(what, f)
    }

    /// [`Self::write`] for a caller that holds the sqlx writer's connection.
    fn write_in_turn<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        let Ok(mut slot) = self.writer.try_lock() else {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if slot.is_none() {
            match self.open(false) {
                Ok(c) => *slot = Some(c),
                Err(e) => return self.outcome(what, Err(e)),
            }
        }
        let conn = slot.as_ref()?;
        let r = f(conn);
        self.outcome(what, r)
    }

    /// [`crate::SessionStore::session_and_history`], inline.
    pub(crate) fn session_and_history(
        &self,
        sql: &str,
        tenant_id: &str,
        session_id: &str,
        limit: u32,
    ) -> Attempt<Option<WithHistory>> {
        let row = self.read("read", |c| {
            let mut stmt = c.prepare_cached(sql)?;
            let mut rows = stmt.query(rusqlite::params![
                tenant_id,
                session_id,
                i64::from(limit),
                tenant_id,
                session_id
            ])?;
            let Some(r) = rows.next()? else {
                return Ok(None);
            };
            // Decoding errors are reported, not retried (the sqlx path would
            // read the same bytes).
            let session = session_from_row(r);
            let history = RowExt::opt_text(r, "history");
            Ok(Some((session, history)))
        })?;
        let Some((session, history)) = row else {
            return Some(Ok(None));
        };
        let decoded = (|| {
            let session = session.map_err(|source| StoreError::Database {
                context: "decoding a session",
                source,
            })?;
            let history = history.map_err(|source| StoreError::Database {
                context: "decoding a session's history",
                source,
            })?;
            Ok(Some((session, history_from_text(history)?)))
        })();
        Some(decoded)
    }

    /// [`crate::SessionStore::insert_messages`] in one statement, inline.
    pub(crate) fn insert_messages(
        &self,
        sqlx_writer: &SqlitePool,
        rows: &[Message],
    ) -> Attempt<()> {
        let sql = insert_messages_sql(rows.len());
        self.write(sqlx_writer, "write", |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let mut i = 0;
            let mut bind = |v: &dyn rusqlite::ToSql| {
                i += 1;
                stmt.raw_bind_parameter(i, v)
            };
            for m in rows {
                bind(&m.id)?;
                bind(&m.tenant_id)?;
                bind(&m.session_id)?;
                bind(&m.role)?;
                bind(&m.content)?;
                bind(&m.status.as_str())?;
                bind(&m.finish_reason)?;
                bind(&m.error_code)?;
                bind(&m.error_message)?;
                bind(&m.model)?;
                bind(&db_int(m.prompt_tokens))?;
                bind(&db_int(m.completion_tokens))?;
                bind(&m.cost_usd)?;
                bind(&m.latency_ms)?;
                bind(&m.trace_id)?;
                bind(&m.instance_id)?;
                bind(&m.created_at_ms)?;
                bind(&m.updated_at_ms)?;
            }
            stmt.raw_execute().map(|_| ())
        })
        .map(Ok)
    }

    /// [`crate::SessionStore::complete_message`] (`sql` is its UPDATE), inline.
    pub(crate) fn complete_message(
        &self,
        sqlx_writer: &SqlitePool,
        sql: &str,
        c: &MessageCompletion,
    ) -> Attempt<bool> {
        self.write(sqlx_writer, "write", |conn| {
            let mut stmt = conn.prepare_cached(sql)?;
            let changed = stmt.execute(rusqlite::params![
                c.status.as_str(),
                c.content,
                c.finish_reason,
                c.error_code,
                c.error_message,
                db_int(c.prompt_tokens),
                db_int(c.completion_tokens),
                c.cost_usd,
                c.latency_ms,
                c.frames,
                c.at_ms,
                c.tenant_id,
                c.id,
            ])?;
            Ok(changed == 1)
        })
        .map(Ok)
    }

    /// One group of [`crate::Store::insert_usage`]'s rows in one
    /// transaction, inline. A writer batch is no request: the caller waits
    /// for the sqlx writer's connection and holds it while this runs.
    pub(crate) fn insert_usage(&self, rows: &[UsageRecord]) -> Attempt<()> {
        self.in_transaction(|c| {
            let mut stmt = c.prepare_cached(crate::sqlite::usage_insert_one())?;
            for r in rows {
                stmt.execute(rusqlite::params![
                    r.id,
                    r.tenant_id,
                    r.key_id,
                    r.user_id,
                    r.trace_id,
                    r.endpoint,
                    r.model_alias,
                    r.provider,
                    r.upstream_model,
                    r.stream,
                    db_int(r.prompt_tokens),
                    db_int(r.completion_tokens),
                    r.cost_usd,
                    r.latency_ms,
                    r.ttft_ms,
                    i64::from(r.status),
                    r.error_code,
                    r.created_at_ms,
                    r.trace.map(|t| t.encode()),
                    db_int(r.cached_tokens),
                    db_int(r.cache_write_tokens),
                ])?;
            }
            Ok(())
        })
    }

    /// One group of [`crate::SessionStore::insert_events`]'s rows in one
    /// transaction, inline, the caller holding the writer's connection.
    pub(crate) fn insert_events(&self, rows: &[EventsRow]) -> Attempt<()> {
        self.in_transaction(|c| {
            let mut stmt = c.prepare_cached(events_insert_one())?;
            for e in rows {
                stmt.execute(rusqlite::params![
                    e.tenant_id,
                    e.trace_id,
                    e.seq,
                    e.id,
                    e.session_id,
                    e.created_at_ms,
                    e.events,
                    e.user_id,
                ])?;
            }
            Ok(())
        })
    }

    /// `f` between `BEGIN IMMEDIATE` and `COMMIT` on the inline writer; a
    /// failure rolls back, so the sqlx path can write the same rows again.
    fn in_transaction(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<()>) -> Attempt<()> {
        self.write_in_turn("batch", |c| {
            let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            f(&tx)?;
            tx.commit()
        })
        .map(Ok)
    }
}

/// The trace-event writer's one-row statement (the usage writer's is
/// `crate::sqlite::usage_insert_one`): without round trips to a worker
/// thread, a prepared statement run once per row costs no more than
/// multi-row ones.
fn events_insert_one() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| insert_events_sql(1))
}

fn insert_messages_sql(rows: usize) -> String {
    let n = MESSAGE_COLUMNS.split(',').count();
    let one = format!("({})", vec!["?"; n].join(", "));
    format!(
        "INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES {}",
        vec![one; rows].join(", ")
    )
}

impl RowExt for rusqlite::Row<'_> {
    fn text(&self, c: &str) -> Result<String, sqlx::Error> {
        self.get(c).map_err(decode)
    }
    fn opt_text(&self, c: &str) -> Result<Option<String>, sqlx::Error> {
        self.get(c).map_err(decode)
    }
    fn int(&self, c: &str) -> Result<i64, sqlx::Error> {
        self.get(c).map_err(decode)
    }
    fn opt_int(&self, c: &str) -> Result<Option<i64>, sqlx::Error> {
        self.get(c).map_err(decode)
    }
    fn opt_float(&self, c: &str) -> Result<Option<f64>, sqlx::Error> {
        self.get(c).map_err(decode)
    }
    fn boolean(&self, c: &str) -> Result<bool, sqlx::Error> {
        self.get(c).map_err(decode)
    }
    fn opt_bytes(&self, c: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        self.get(c).map_err(decode)
    }
}

fn decode(e: rusqlite::Error) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}
