//! What both backends share for bots, sessions, messages, trace events,
//! idempotency records and a user's data: the SQL text (written with `?`
//! placeholders; [`crate::identity::pg`] numbers them for PostgreSQL) and the
//! decoding of rows. JSON columns (`metadata`, `state`, `payload`,
//! `response_headers`) are stored as text, as in `identity.rs`.
//!
//! One statement differs between the backends, the state merge: SQLite has
//! `json_patch()`, PostgreSQL the `sy_json_merge_patch()` function of
//! migration 0005. Both implement RFC 7396, so the macro takes the merge
//! expression as an argument.

use serde_json::{Map, Value};
use switchyard_core::sessions::{
    Bot, BusEvent, IdempotencyClaim, Message, MessageStatus, Session, StoredResponse,
};

use crate::identity::{from_json, RowExt};

pub(crate) const BOT_COLUMNS: &str = "id, tenant_id, name, model, system_prompt, temperature, \
     max_tokens, context_tokens, metadata, created_at_ms, updated_at_ms";
pub(crate) const SESSION_COLUMNS: &str =
    "id, tenant_id, bot_id, user_id, metadata, state, state_version, created_at_ms";
/// Every `messages` column but `frames` (read only by `message_frames`).
pub(crate) const MESSAGE_COLUMNS: &str =
    "id, tenant_id, session_id, role, content, status, finish_reason, error_code, \
     error_message, model, prompt_tokens, completion_tokens, cost_usd, latency_ms, trace_id, \
     instance_id, created_at_ms, updated_at_ms";
/// A `bus_events` row holds the consecutive events of one trace written in
/// one batch (usually a whole request: received, attempts, done), as a JSON
/// array in `events`; `seq`, `id` and `created_at_ms` are its first event's.
/// One row per request instead of one per event keeps tracing cheap enough
/// for every request (see docs/sessions.md, "Traces").
pub(crate) const EVENT_COLUMNS: &str =
    "tenant_id, trace_id, seq, id, session_id, created_at_ms, events, user_id";
const IDEMPOTENCY_COLUMNS: &str = "request_hash, status, response_status, response_headers, \
     response_body, locked_until_ms, expires_at_ms";

/// The `error_message` of a message interrupted by a restart.
pub(crate) const INTERRUPTED_MESSAGE: &str = "The server stopped before the reply was complete.";

/// Rows per `bus_events` INSERT statement, largest first; the last must be 1.
/// A few fixed sizes keep the statements few and cached.
pub(crate) const EVENT_CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// How often a claim starts over when the record it met vanished.
pub(crate) const CLAIM_ATTEMPTS: usize = 3;

fn values(columns: &str) -> String {
    let n = columns.split(',').count();
    format!("({})", vec!["?"; n].join(", "))
}

pub(crate) fn insert_sql(table: &str, columns: &str) -> String {
    format!("INSERT INTO {table} ({columns}) VALUES {}", values(columns))
}

/// The session with its history (`history`: the backend's aggregate of
/// the newest turns, a scalar subquery, so its placeholders come first).
pub(crate) fn session_and_history_sql(history: &str) -> String {
    format!(
        "SELECT {SESSION_COLUMNS}, ({history}) AS history FROM sessions WHERE tenant_id = ? AND id = ?"
    )
}

/// A multi-row `bus_events` INSERT of `rows` rows.
pub(crate) fn insert_events_sql(rows: usize) -> String {
    format!(
        "INSERT INTO bus_events ({EVENT_COLUMNS}) VALUES {} ON CONFLICT DO NOTHING",
        vec![values(EVENT_COLUMNS); rows].join(", ")
    )
}

/// The state merge in one statement: the version moves only when the row
/// (and, with `if_version`, that version) matched. `merge` is the backend's
/// RFC 7396 expression of `state` and one placeholder.
pub(crate) fn patch_state_sql(merge: &str) -> String {
    format!(
        "UPDATE sessions SET state = {merge}, state_version = state_version + 1 \
         WHERE tenant_id = ? AND id = ? AND (? IS NULL OR state_version = ?) \
         RETURNING state, state_version"
    )
}

pub(crate) fn claim_insert_sql() -> String {
    "INSERT INTO idempotency_keys (tenant_id, key, request_hash, user_id, status, created_at_ms, \
     locked_until_ms, expires_at_ms, owner) VALUES (?, ?, ?, ?, 'in_flight', ?, ?, ?, ?) \
     ON CONFLICT (tenant_id, key) DO NOTHING"
        .to_owned()
}

/// Takes over a record nobody holds any more: a finished one past its
/// expiry, or an in-flight one past its lease. The condition is evaluated on
/// the row as it is when the UPDATE locks it, so two takeovers cannot both win.
pub(crate) fn claim_takeover_sql() -> String {
    "UPDATE idempotency_keys SET request_hash = ?, user_id = ?, status = 'in_flight', \
     response_status = NULL, response_headers = NULL, response_body = NULL, \
     created_at_ms = ?, locked_until_ms = ?, expires_at_ms = ?, owner = ? \
     WHERE tenant_id = ? AND key = ? \
     AND ((status = 'complete' AND expires_at_ms <= ?) OR (status = 'in_flight' AND locked_until_ms <= ?))"
        .to_owned()
}

pub(crate) fn claim_read_sql() -> String {
    format!("SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE tenant_id = ? AND key = ?")
}

fn decode_err(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

fn opt_u32(r: &impl RowExt, c: &str) -> Result<Option<u32>, sqlx::Error> {
    r.opt_int(c)?
        .map(|v| u32::try_from(v).map_err(|_| decode_err(format!("{c}: {v} out of range"))))
        .transpose()
}

fn opt_u64(r: &impl RowExt, c: &str) -> Result<Option<u64>, sqlx::Error> {
    r.opt_int(c)?
        .map(|v| u64::try_from(v).map_err(|_| decode_err(format!("{c}: {v} out of range"))))
        .transpose()
}

/// A count for an integer column (saturating: no count reaches `i64::MAX`).
pub(crate) fn db_int(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

pub(crate) fn object(what: &str, text: &str) -> Result<Map<String, Value>, sqlx::Error> {
    from_json(what, text)
}

pub(crate) fn bot_from_row(r: &impl RowExt) -> Result<Bot, sqlx::Error> {
    Ok(Bot {
        id: r.text("id")?,
        tenant_id: r.text("tenant_id")?,
        name: r.text("name")?,
        model: r.text("model")?,
        system_prompt: r.opt_text("system_prompt")?,
        temperature: r.opt_float("temperature")?,
        max_tokens: opt_u32(r, "max_tokens")?,
        context_tokens: opt_u32(r, "context_tokens")?,
        metadata: object("metadata", &r.text("metadata")?)?,
        created_at_ms: r.int("created_at_ms")?,
        updated_at_ms: r.int("updated_at_ms")?,
    })
}

pub(crate) fn session_from_row(r: &impl RowExt) -> Result<Session, sqlx::Error> {
    Ok(Session {
        id: r.text("id")?,
        tenant_id: r.text("tenant_id")?,
        bot_id: r.opt_text("bot_id")?,
        user_id: r.opt_text("user_id")?,
        metadata: object("metadata", &r.text("metadata")?)?,
        state: object("state", &r.text("state")?)?,
        state_version: r.int("state_version")?,
        created_at_ms: r.int("created_at_ms")?,
    })
}

pub(crate) fn message_from_row(r: &impl RowExt) -> Result<Message, sqlx::Error> {
    let status = r.text("status")?;
    Ok(Message {
        id: r.text("id")?,
        tenant_id: r.text("tenant_id")?,
        session_id: r.text("session_id")?,
        role: r.text("role")?,
        content: r.text("content")?,
        status: MessageStatus::parse(&status)
            .ok_or_else(|| decode_err(format!("unknown message status {status}")))?,
        finish_reason: r.opt_text("finish_reason")?,
        error_code: r.opt_text("error_code")?,
        error_message: r.opt_text("error_message")?,
        model: r.opt_text("model")?,
        prompt_tokens: opt_u64(r, "prompt_tokens")?,
        completion_tokens: opt_u64(r, "completion_tokens")?,
        cost_usd: r.opt_float("cost_usd")?,
        latency_ms: r.opt_float("latency_ms")?,
        trace_id: r.opt_text("trace_id")?,
        instance_id: r.opt_text("instance_id")?,
        created_at_ms: r.int("created_at_ms")?,
        updated_at_ms: r.int("updated_at_ms")?,
    })
}

#[derive(serde::Deserialize)]
struct UnpackedEvent {
    id: String,
    seq: i64,
    kind: String,
    payload: serde_json::Value,
    created_at_ms: i64,
}

/// A history as the backends aggregate it (`[[id, role, content], ...]`, in
/// no promised order) as `(role, content)`, newest first.
pub(crate) fn history_from_text(
    text: Option<String>,
) -> Result<Vec<(String, String)>, crate::StoreError> {
    let mut turns: Vec<(String, String, String)> = match text {
        Some(t) => serde_json::from_str(&t)
            .map_err(|e| crate::StoreError::Corrupt(format!("history: {e}")))?,
        None => Vec::new(),
    };
    turns.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(turns
        .into_iter()
        .map(|(_, role, content)| (role, content))
        .collect())
}

/// The events of one `bus_events` row.
pub(crate) fn events_from_row(r: &impl RowExt) -> Result<Vec<BusEvent>, sqlx::Error> {
    let tenant_id = r.text("tenant_id")?;
    let trace_id = r.text("trace_id")?;
    let session_id = r.opt_text("session_id")?;
    let user_id = r.opt_text("user_id")?;
    let packed: Vec<UnpackedEvent> = from_json("events", &r.text("events")?)?;
    Ok(packed
        .into_iter()
        .map(|e| BusEvent {
            id: e.id,
            tenant_id: tenant_id.clone(),
            trace_id: trace_id.clone(),
            seq: e.seq,
            kind: e.kind,
            session_id: session_id.clone(),
            user_id: user_id.clone(),
            payload: e.payload,
            created_at_ms: e.created_at_ms,
        })
        .collect())
}

/// What a claim that neither inserted nor took over found: `None` when the
/// record is one nobody holds (it changed hands between the statements;
/// the claim starts over).
pub(crate) fn claim_from_row(
    r: &impl RowExt,
    request_hash: &str,
    now_ms: i64,
) -> Result<Option<IdempotencyClaim>, sqlx::Error> {
    let same_request = r.text("request_hash")? == request_hash;
    match r.text("status")?.as_str() {
        "in_flight" if r.int("locked_until_ms")? > now_ms => {
            Ok(Some(IdempotencyClaim::InFlight { same_request }))
        }
        "complete" if r.int("expires_at_ms")? > now_ms => {
            let status = r
                .opt_int("response_status")?
                .ok_or_else(|| decode_err("a complete record without a status".into()))?;
            let headers = match r.opt_text("response_headers")? {
                Some(t) => from_json("response_headers", &t)?,
                None => Vec::new(),
            };
            Ok(Some(IdempotencyClaim::Done {
                same_request,
                response: StoredResponse {
                    status: u16::try_from(status)
                        .map_err(|_| decode_err(format!("response_status {status}")))?,
                    headers,
                    body: r.opt_bytes("response_body")?.unwrap_or_default(),
                },
            }))
        }
        "in_flight" | "complete" => Ok(None),
        other => Err(decode_err(format!("unknown idempotency status {other}"))),
    }
}

/// [`crate::SessionStore`] for a backend, written once and expanded with the
/// backend's placeholder style (`lite_once` or `pg_once`) and its RFC 7396
/// merge expression of `state` and one `?` (the patch, as JSON text).
/// `user_data` reads usage rows through the backend's own `user_usage`.
/// One row of `$table` by tenant and id, decoded (inside `session_store!`).
macro_rules! by_tenant_and_id {
    ($self:ident, $conv:ident, $table:literal, $columns:ident, $decode:ident, $tenant:expr, $id:expr, $what:literal) => {{
        use $crate::sessions::*;
        let sql = $conv!(format!(
            "SELECT {} FROM {} WHERE tenant_id = ? AND id = ?",
            $columns, $table
        ));
        let row = sqlx::query(sql)
            .bind($tenant)
            .bind($id)
            .fetch_optional(&$self.pool)
            .await
            .context(concat!("reading a ", $what))?;
        row.as_ref()
            .map($decode)
            .transpose()
            .context(concat!("decoding a ", $what))
    }};
}
pub(crate) use by_tenant_and_id;

/// A backend's reads of usage rows for the session store: a user's rows,
/// oldest first (for [`crate::SessionStore::user_data`]), and the rows of one trace
/// that keep its events ([`switchyard_core::usage::PlainTrace`], for
/// [`crate::SessionStore::list_trace_events`]). Expanded in the backend's module,
/// with its placeholder style, time column, `USAGE_SELECT` and
/// `usage_from_row`.
macro_rules! usage_reads {
    ($store:ty, $conv:ident, $time:literal) => {
        impl $store {
            async fn user_usage(
                &self,
                tenant_id: &str,
                user_id: &str,
            ) -> Result<Vec<UsageRecord>, StoreError> {
                let sql = $conv!(format!(
                    "SELECT {USAGE_SELECT} FROM usage_logs WHERE tenant_id = ? AND user_id = ? ORDER BY {}, id",
                    $time
                ));
                self.usage_rows(sql, tenant_id, user_id, "reading a user's usage rows")
                    .await
            }

            async fn trace_usage(
                &self,
                tenant_id: &str,
                trace_id: &str,
            ) -> Result<Vec<UsageRecord>, StoreError> {
                let sql = $conv!(format!(
                    "SELECT {USAGE_SELECT} FROM usage_logs WHERE tenant_id = ? AND trace_id = ? AND trace_ms IS NOT NULL"
                ));
                self.usage_rows(sql, tenant_id, trace_id, "reading a trace's usage rows")
                    .await
            }

            /// Usage rows selected by a statement with two text parameters.
            async fn usage_rows(
                &self,
                sql: &'static str,
                a: &str,
                b: &str,
                what: &'static str,
            ) -> Result<Vec<UsageRecord>, StoreError> {
                let rows = sqlx::query(sql)
                    .bind(a)
                    .bind(b)
                    .fetch_all(&self.pool)
                    .await
                    .context(what)?;
                rows.iter()
                    .map(usage_from_row)
                    .collect::<Result<_, sqlx::Error>>()
                    .context("reading usage rows")
            }
        }
    };
}
pub(crate) use usage_reads;

macro_rules! session_store {
    ($store:ty, $conv:ident, $merge:expr, $history:expr) => {
    #[async_trait::async_trait]
    impl $crate::SessionStore for $store {
        async fn insert_bot(
            &self,
            b: &switchyard_core::sessions::Bot,
        ) -> Result<(), $crate::StoreError> {
            use $crate::sessions::*;
            sqlx::query($conv!(insert_sql("bots", BOT_COLUMNS)))
                .bind(&b.id)
                .bind(&b.tenant_id)
                .bind(&b.name)
                .bind(&b.model)
                .bind(&b.system_prompt)
                .bind(b.temperature)
                .bind(b.max_tokens.map(i64::from))
                .bind(b.context_tokens.map(i64::from))
                .bind($crate::identity::json_text(&b.metadata)?)
                .bind(b.created_at_ms)
                .bind(b.updated_at_ms)
                .execute(&self.writer)
                .await
                .context("storing a bot")?;
            Ok(())
        }

        async fn get_bot(
            &self,
            tenant_id: &str,
            id: &str,
        ) -> Result<Option<switchyard_core::sessions::Bot>, $crate::StoreError> {
            $crate::sessions::by_tenant_and_id!(self, $conv, "bots", BOT_COLUMNS, bot_from_row, tenant_id, id, "bot")
        }

        async fn list_bots(
            &self,
            tenant_id: &str,
            before_id: Option<&str>,
            limit: u32,
        ) -> Result<Vec<switchyard_core::sessions::Bot>, $crate::StoreError> {
            use $crate::sessions::*;
            let sql = $conv!(format!(
                "SELECT {BOT_COLUMNS} FROM bots WHERE tenant_id = ? AND (? IS NULL OR id < ?) \
                 ORDER BY id DESC LIMIT ?"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .bind(before_id)
                .bind(before_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .context("listing bots")?;
            rows.iter().map(bot_from_row).collect::<Result<_, _>>().context("decoding bots")
        }

        async fn update_bot(
            &self,
            b: &switchyard_core::sessions::Bot,
        ) -> Result<bool, $crate::StoreError> {
            let sql = $conv!(
                "UPDATE bots SET name = ?, model = ?, system_prompt = ?, temperature = ?, max_tokens = ?, \
                 context_tokens = ?, metadata = ?, updated_at_ms = ? WHERE tenant_id = ? AND id = ?"
            );
            let r = sqlx::query(sql)
                .bind(&b.name)
                .bind(&b.model)
                .bind(&b.system_prompt)
                .bind(b.temperature)
                .bind(b.max_tokens.map(i64::from))
                .bind(b.context_tokens.map(i64::from))
                .bind($crate::identity::json_text(&b.metadata)?)
                .bind(b.updated_at_ms)
                .bind(&b.tenant_id)
                .bind(&b.id)
                .execute(&self.writer)
                .await
                .context("updating a bot")?;
            Ok(r.rows_affected() == 1)
        }

        async fn delete_bot(&self, tenant_id: &str, id: &str) -> Result<bool, $crate::StoreError> {
            let r = sqlx::query($conv!("DELETE FROM bots WHERE tenant_id = ? AND id = ?"))
                .bind(tenant_id)
                .bind(id)
                .execute(&self.writer)
                .await
                .context("deleting a bot")?;
            Ok(r.rows_affected() == 1)
        }

        async fn insert_session(
            &self,
            s: &switchyard_core::sessions::Session,
        ) -> Result<(), $crate::StoreError> {
            use $crate::sessions::*;
            sqlx::query($conv!(insert_sql("sessions", SESSION_COLUMNS)))
                .bind(&s.id)
                .bind(&s.tenant_id)
                .bind(&s.bot_id)
                .bind(&s.user_id)
                .bind($crate::identity::json_text(&s.metadata)?)
                .bind($crate::identity::json_text(&s.state)?)
                .bind(s.state_version)
                .bind(s.created_at_ms)
                .execute(&self.writer)
                .await
                .context("storing a session")?;
            Ok(())
        }

        async fn get_session(
            &self,
            tenant_id: &str,
            id: &str,
        ) -> Result<Option<switchyard_core::sessions::Session>, $crate::StoreError> {
            $crate::sessions::by_tenant_and_id!(self, $conv, "sessions", SESSION_COLUMNS, session_from_row, tenant_id, id, "session")
        }

        async fn list_sessions(
            &self,
            tenant_id: &str,
            q: &switchyard_core::sessions::SessionQuery,
        ) -> Result<Vec<switchyard_core::sessions::Session>, $crate::StoreError> {
            use $crate::sessions::*;
            let sql = $conv!(format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant_id = ? \
                 AND (? IS NULL OR user_id = ?) AND (? IS NULL OR bot_id = ?) \
                 AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .bind(&q.user_id)
                .bind(&q.user_id)
                .bind(&q.bot_id)
                .bind(&q.bot_id)
                .bind(&q.before_id)
                .bind(&q.before_id)
                .bind(i64::from(q.limit))
                .fetch_all(&self.pool)
                .await
                .context("listing sessions")?;
            rows.iter()
                .map(session_from_row)
                .collect::<Result<_, _>>()
                .context("decoding sessions")
        }

        async fn delete_session(
            &self,
            tenant_id: &str,
            id: &str,
        ) -> Result<bool, $crate::StoreError> {
            let mut tx = self.writer.begin().await.context("starting a session deletion")?;
            sqlx::query($conv!("DELETE FROM messages WHERE tenant_id = ? AND session_id = ?"))
                .bind(tenant_id)
                .bind(id)
                .execute(&mut *tx)
                .await
                .context("deleting a session's messages")?;
            let r = sqlx::query($conv!("DELETE FROM sessions WHERE tenant_id = ? AND id = ?"))
                .bind(tenant_id)
                .bind(id)
                .execute(&mut *tx)
                .await
                .context("deleting a session")?;
            tx.commit().await.context("committing a session deletion")?;
            Ok(r.rows_affected() == 1)
        }

        async fn patch_state(
            &self,
            tenant_id: &str,
            id: &str,
            patch: &serde_json::Map<String, serde_json::Value>,
            if_version: Option<i64>,
        ) -> Result<switchyard_core::sessions::StatePatch, $crate::StoreError> {
            use $crate::identity::RowExt;
            use $crate::sessions::*;
            use switchyard_core::sessions::StatePatch;
            let row = sqlx::query($conv!(patch_state_sql($merge)))
                .bind($crate::identity::json_text(patch)?)
                .bind(tenant_id)
                .bind(id)
                .bind(if_version)
                .bind(if_version)
                .fetch_optional(&self.writer)
                .await
                .context("merging a session's state")?;
            if let Some(row) = row {
                let applied = (|| {
                    Ok::<_, sqlx::Error>(StatePatch::Applied {
                        state: object("state", &row.text("state")?)?,
                        version: row.int("state_version")?,
                    })
                })();
                return applied.context("decoding a merged state");
            }
            let current: Option<i64> = sqlx::query_scalar($conv!(
                "SELECT state_version FROM sessions WHERE tenant_id = ? AND id = ?"
            ))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .context("reading a session's state version")?;
            Ok(match current {
                Some(current) => StatePatch::VersionMismatch { current },
                None => StatePatch::NotFound,
            })
        }

        async fn insert_messages(
            &self,
            rows: &[switchyard_core::sessions::Message],
        ) -> Result<(), $crate::StoreError> {
            use $crate::sessions::*;
            if rows.is_empty() {
                return Ok(());
            }
            if let Some(r) = self.fast_insert_messages(rows) {
                return r;
            }
            // One multi-row statement: atomic without a transaction, and one
            // round trip on the way to a reply's first token.
            let mut qb = sqlx::QueryBuilder::new(format!(
                "INSERT INTO messages ({MESSAGE_COLUMNS}) "
            ));
            qb.push_values(rows, |mut b, m| {
                b.push_bind(&m.id)
                    .push_bind(&m.tenant_id)
                    .push_bind(&m.session_id)
                    .push_bind(&m.role)
                    .push_bind(&m.content)
                    .push_bind(m.status.as_str())
                    .push_bind(&m.finish_reason)
                    .push_bind(&m.error_code)
                    .push_bind(&m.error_message)
                    .push_bind(&m.model)
                    .push_bind(db_int(m.prompt_tokens))
                    .push_bind(db_int(m.completion_tokens))
                    .push_bind(m.cost_usd)
                    .push_bind(m.latency_ms)
                    .push_bind(&m.trace_id)
                    .push_bind(&m.instance_id)
                    .push_bind(m.created_at_ms)
                    .push_bind(m.updated_at_ms);
            });
            qb.build()
                .execute(&self.writer)
                .await
                .context("storing messages")?;
            Ok(())
        }

        async fn get_message(
            &self,
            tenant_id: &str,
            id: &str,
        ) -> Result<Option<switchyard_core::sessions::Message>, $crate::StoreError> {
            $crate::sessions::by_tenant_and_id!(self, $conv, "messages", MESSAGE_COLUMNS, message_from_row, tenant_id, id, "message")
        }

        async fn list_messages(
            &self,
            tenant_id: &str,
            session_id: &str,
            after_id: Option<&str>,
            limit: u32,
        ) -> Result<Vec<switchyard_core::sessions::Message>, $crate::StoreError> {
            use $crate::sessions::*;
            let sql = $conv!(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE tenant_id = ? AND session_id = ? \
                 AND (? IS NULL OR id > ?) ORDER BY id ASC LIMIT ?"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .bind(session_id)
                .bind(after_id)
                .bind(after_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .context("listing messages")?;
            rows.iter()
                .map(message_from_row)
                .collect::<Result<_, _>>()
                .context("decoding messages")
        }

        async fn history(
            &self,
            tenant_id: &str,
            session_id: &str,
            limit: u32,
        ) -> Result<Vec<(String, String)>, $crate::StoreError> {
            let text: Option<String> = sqlx::query_scalar($conv!($history))
                .bind(tenant_id)
                .bind(session_id)
                .bind(i64::from(limit))
                .fetch_one(&self.pool)
                .await
                .context("reading a session's history")?;
            $crate::sessions::history_from_text(text)
        }

        async fn session_and_history(
            &self,
            tenant_id: &str,
            session_id: &str,
            limit: u32,
        ) -> Result<
            Option<(switchyard_core::sessions::Session, Vec<(String, String)>)>,
            $crate::StoreError,
        > {
            use $crate::sessions::*;
            let sql = $conv!(session_and_history_sql($history));
            if let Some(r) = self.fast_session_and_history(sql, tenant_id, session_id, limit) {
                return r;
            }
            let row = sqlx::query(sql)
                .bind(tenant_id)
                .bind(session_id)
                .bind(i64::from(limit))
                .bind(tenant_id)
                .bind(session_id)
                .fetch_optional(&self.pool)
                .await
                .context("reading a session and its history")?;
            let Some(row) = row else { return Ok(None) };
            let session = session_from_row(&row).context("decoding a session")?;
            let text = $crate::identity::RowExt::opt_text(&row, "history")
                .context("decoding a session's history")?;
            Ok(Some((session, history_from_text(text)?)))
        }

        async fn complete_message(
            &self,
            c: &switchyard_core::sessions::MessageCompletion,
        ) -> Result<bool, $crate::StoreError> {
            use $crate::sessions::*;
            let sql = $conv!(
                "UPDATE messages SET status = ?, content = ?, finish_reason = ?, error_code = ?, \
                 error_message = ?, prompt_tokens = ?, completion_tokens = ?, cost_usd = ?, latency_ms = ?, \
                 frames = ?, updated_at_ms = ? WHERE tenant_id = ? AND id = ? AND status = 'streaming'"
            );
            if let Some(r) = self.fast_complete_message(sql, c) {
                return r;
            }
            let r = sqlx::query(sql)
                .bind(c.status.as_str())
                .bind(&c.content)
                .bind(&c.finish_reason)
                .bind(&c.error_code)
                .bind(&c.error_message)
                .bind(db_int(c.prompt_tokens))
                .bind(db_int(c.completion_tokens))
                .bind(c.cost_usd)
                .bind(c.latency_ms)
                .bind(&c.frames)
                .bind(c.at_ms)
                .bind(&c.tenant_id)
                .bind(&c.id)
                .execute(&self.writer)
                .await
                .context("completing a message")?;
            Ok(r.rows_affected() == 1)
        }

        async fn message_frames(
            &self,
            tenant_id: &str,
            id: &str,
        ) -> Result<Option<String>, $crate::StoreError> {
            let frames: Option<Option<String>> = sqlx::query_scalar($conv!(
                "SELECT frames FROM messages WHERE tenant_id = ? AND id = ?"
            ))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .context("reading a message's frames")?;
            Ok(frames.flatten())
        }

        async fn interrupt_streaming(
            &self,
            instance_id: Option<&str>,
            stale_before_ms: Option<i64>,
            now_ms: i64,
        ) -> Result<u64, $crate::StoreError> {
            use $crate::sessions::*;
            if instance_id.is_none() && stale_before_ms.is_none() {
                return Ok(0);
            }
            // Across tenants: a restart cleans up after the whole instance.
            let sql = $conv!(
                "UPDATE messages SET status = 'failed', error_code = 'interrupted', error_message = ?, \
                 updated_at_ms = ? WHERE status = 'streaming' \
                 AND ((? IS NOT NULL AND instance_id = ?) OR (? IS NOT NULL AND updated_at_ms < ?))"
            );
            let r = sqlx::query(sql)
                .bind(INTERRUPTED_MESSAGE)
                .bind(now_ms)
                .bind(instance_id)
                .bind(instance_id)
                .bind(stale_before_ms)
                .bind(stale_before_ms)
                .execute(&self.writer)
                .await
                .context("interrupting streaming messages")?;
            Ok(r.rows_affected())
        }

        async fn insert_events(
            &self,
            rows: &[switchyard_core::sessions::EventsRow],
        ) -> Result<(), $crate::StoreError> {
            use $crate::sessions::*;
            if rows.is_empty() {
                return Ok(());
            }
            let sqls: [&'static str; 4] = [
                $conv!(insert_events_sql(EVENT_CHUNKS[0])),
                $conv!(insert_events_sql(EVENT_CHUNKS[1])),
                $conv!(insert_events_sql(EVENT_CHUNKS[2])),
                $conv!(insert_events_sql(EVENT_CHUNKS[3])),
            ];
            // At most WRITE_GROUP rows per transaction (see insert_usage);
            // `ON CONFLICT DO NOTHING` makes a retried batch safe.
            for group in rows.chunks($crate::WRITE_GROUP) {
                if let Some(done) = self.fast_insert_events(group).await {
                    done?;
                    continue;
                }
                let mut tx = self.writer.begin().await.context("starting the event transaction")?;
                let mut rest = group;
                for (size, sql) in EVENT_CHUNKS.iter().zip(sqls) {
                    while rest.len() >= *size {
                        let (chunk, tail) = rest.split_at(*size);
                        rest = tail;
                        let mut q = sqlx::query(sql);
                        for e in chunk {
                            q = q
                                .bind(&e.tenant_id)
                                .bind(&e.trace_id)
                                .bind(e.seq)
                                .bind(&e.id)
                                .bind(&e.session_id)
                                .bind(e.created_at_ms)
                                .bind(&e.events)
                                .bind(&e.user_id);
                        }
                        q.execute(&mut *tx).await.context("storing events")?;
                    }
                }
                tx.commit().await.context("committing events")?;
            }
            Ok(())
        }

        async fn list_trace_events(
            &self,
            tenant_id: &str,
            trace_id: &str,
        ) -> Result<Vec<switchyard_core::sessions::BusEvent>, $crate::StoreError> {
            use $crate::sessions::*;
            let sql = $conv!(format!(
                "SELECT {EVENT_COLUMNS} FROM bus_events WHERE tenant_id = ? AND trace_id = ?"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .bind(trace_id)
                .fetch_all(&self.pool)
                .await
                .context("listing a trace's events")?;
            let mut events = Vec::new();
            for r in &rows {
                events.extend(events_from_row(r).context("decoding events")?);
            }
            for u in self.trace_usage(tenant_id, trace_id).await? {
                events.extend(u.plain_trace_events());
            }
            events.sort_by(|a, b| {
                (a.created_at_ms, a.seq, &a.id).cmp(&(b.created_at_ms, b.seq, &b.id))
            });
            Ok(events)
        }

        async fn claim_idempotency(
            &self,
            k: &switchyard_core::sessions::IdempotencyKey,
        ) -> Result<switchyard_core::sessions::IdempotencyClaim, $crate::StoreError> {
            use $crate::sessions::*;
            use switchyard_core::sessions::IdempotencyClaim;
            let until = k.now_ms.saturating_add(k.lease_ms);
            for _ in 0..CLAIM_ATTEMPTS {
                // 1. A new key: the insert wins or meets the record (PostgreSQL
                // waits for a concurrent insert of the same key to commit).
                let r = sqlx::query($conv!(claim_insert_sql()))
                    .bind(&k.tenant_id)
                    .bind(&k.key)
                    .bind(&k.request_hash)
                    .bind(&k.user_id)
                    .bind(k.now_ms)
                    .bind(until)
                    .bind(until)
                    .bind(&k.owner)
                    .execute(&self.writer)
                    .await
                    .context("claiming an idempotency key")?;
                if r.rows_affected() == 1 {
                    return Ok(IdempotencyClaim::Acquired);
                }
                // 2. A record nobody holds any more is taken over.
                let r = sqlx::query($conv!(claim_takeover_sql()))
                    .bind(&k.request_hash)
                    .bind(&k.user_id)
                    .bind(k.now_ms)
                    .bind(until)
                    .bind(until)
                    .bind(&k.owner)
                    .bind(&k.tenant_id)
                    .bind(&k.key)
                    .bind(k.now_ms)
                    .bind(k.now_ms)
                    .execute(&self.writer)
                    .await
                    .context("taking over an idempotency key")?;
                if r.rows_affected() == 1 {
                    return Ok(IdempotencyClaim::Acquired);
                }
                // 3. Someone holds it: report who.
                let row = sqlx::query($conv!(claim_read_sql()))
                    .bind(&k.tenant_id)
                    .bind(&k.key)
                    .fetch_optional(&self.pool)
                    .await
                    .context("reading an idempotency key")?;
                if let Some(row) = row {
                    let held = claim_from_row(&row, &k.request_hash, k.now_ms)
                        .context("decoding an idempotency key")?;
                    if let Some(held) = held {
                        return Ok(held);
                    }
                }
                // Released or expired in between: start over.
            }
            // The record kept changing hands: report it as busy, so the
            // client retries later.
            Ok(IdempotencyClaim::InFlight { same_request: true })
        }

        async fn complete_idempotency(
            &self,
            tenant_id: &str,
            key: &str,
            owner: &str,
            response: &switchyard_core::sessions::StoredResponse,
            expires_at_ms: i64,
        ) -> Result<(), $crate::StoreError> {
            let sql = $conv!(
                "UPDATE idempotency_keys SET status = 'complete', response_status = ?, response_headers = ?, \
                 response_body = ?, expires_at_ms = ? WHERE tenant_id = ? AND key = ? AND status = 'in_flight' \
                 AND owner = ?"
            );
            sqlx::query(sql)
                .bind(i64::from(response.status))
                .bind($crate::identity::json_text(&response.headers)?)
                .bind(&response.body)
                .bind(expires_at_ms)
                .bind(tenant_id)
                .bind(key)
                .bind(owner)
                .execute(&self.writer)
                .await
                .context("completing an idempotency key")?;
            Ok(())
        }

        async fn release_idempotency(
            &self,
            tenant_id: &str,
            key: &str,
            owner: &str,
        ) -> Result<(), $crate::StoreError> {
            let sql = $conv!(
                "DELETE FROM idempotency_keys WHERE tenant_id = ? AND key = ? AND status = 'in_flight' \
                 AND owner = ?"
            );
            sqlx::query(sql)
                .bind(tenant_id)
                .bind(key)
                .bind(owner)
                .execute(&self.writer)
                .await
                .context("releasing an idempotency key")?;
            Ok(())
        }

        async fn purge_idempotency(&self, now_ms: i64) -> Result<u64, $crate::StoreError> {
            let sql = $conv!(
                "DELETE FROM idempotency_keys WHERE (status = 'complete' AND expires_at_ms <= ?) \
                 OR (status = 'in_flight' AND locked_until_ms <= ?)"
            );
            let r = sqlx::query(sql)
                .bind(now_ms)
                .bind(now_ms)
                .execute(&self.writer)
                .await
                .context("purging idempotency keys")?;
            Ok(r.rows_affected())
        }

        async fn user_data(
            &self,
            tenant_id: &str,
            user_id: &str,
        ) -> Result<switchyard_core::sessions::UserData, $crate::StoreError> {
            use $crate::sessions::*;
            let sql = $conv!(format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant_id = ? AND user_id = ? ORDER BY id"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .bind(user_id)
                .fetch_all(&self.pool)
                .await
                .context("reading a user's sessions")?;
            let sessions = rows
                .iter()
                .map(session_from_row)
                .collect::<Result<_, _>>()
                .context("decoding sessions")?;
            let sql = $conv!(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE tenant_id = ? AND session_id IN \
                 (SELECT id FROM sessions WHERE tenant_id = ? AND user_id = ?) ORDER BY id"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .bind(tenant_id)
                .bind(user_id)
                .fetch_all(&self.pool)
                .await
                .context("reading a user's messages")?;
            let messages = rows
                .iter()
                .map(message_from_row)
                .collect::<Result<_, _>>()
                .context("decoding messages")?;
            Ok(switchyard_core::sessions::UserData {
                sessions,
                messages,
                usage: self.user_usage(tenant_id, user_id).await?,
            })
        }

        async fn erase_user(
            &self,
            tenant_id: &str,
            user_id: &str,
        ) -> Result<switchyard_core::sessions::Erased, $crate::StoreError> {
            let mut tx = self.writer.begin().await.context("starting a user erasure")?;
            // Children first: the sessions' ids are found through the sessions.
            let events = sqlx::query($conv!(
                "DELETE FROM bus_events WHERE tenant_id = ? AND (user_id = ? OR session_id IN \
                 (SELECT id FROM sessions WHERE tenant_id = ? AND user_id = ?))"
            ))
            .bind(tenant_id)
            .bind(user_id)
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("erasing a user's events")?;
            let messages = sqlx::query($conv!(
                "DELETE FROM messages WHERE tenant_id = ? AND session_id IN \
                 (SELECT id FROM sessions WHERE tenant_id = ? AND user_id = ?)"
            ))
            .bind(tenant_id)
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("erasing a user's messages")?;
            let sessions = sqlx::query($conv!(
                "DELETE FROM sessions WHERE tenant_id = ? AND user_id = ?"
            ))
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("erasing a user's sessions")?;
            let idempotency = sqlx::query($conv!(
                "DELETE FROM idempotency_keys WHERE tenant_id = ? AND user_id = ?"
            ))
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("erasing a user's idempotency keys")?;
            sqlx::query($conv!("DELETE FROM users WHERE tenant_id = ? AND id = ?"))
                .bind(tenant_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .context("erasing a user")?;
            // A plain request's events live in its usage row (`trace_ms`).
            let usage_traces = sqlx::query($conv!(
                "UPDATE usage_logs SET trace_ms = NULL \
                 WHERE tenant_id = ? AND user_id = ? AND trace_ms IS NOT NULL"
            ))
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("erasing the events of a user's requests")?;
            let usage = sqlx::query($conv!(
                "UPDATE usage_logs SET user_id = NULL WHERE tenant_id = ? AND user_id = ?"
            ))
            .bind(tenant_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("anonymising a user's usage")?;
            tx.commit().await.context("committing a user erasure")?;
            Ok(switchyard_core::sessions::Erased {
                sessions: sessions.rows_affected(),
                messages: messages.rows_affected(),
                events: events.rows_affected() + usage_traces.rows_affected(),
                idempotency_records: idempotency.rows_affected(),
                usage_anonymised: usage.rows_affected(),
            })
        }
    }
    };
}
pub(crate) use session_store;

#[cfg(test)]
mod tests {
    #[test]
    fn event_inserts_have_a_row_of_placeholders_per_packed_row() {
        let sql = super::insert_events_sql(2);
        assert_eq!(sql.matches('?').count(), 16);
        assert!(sql.ends_with(
            "(?, ?, ?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
        ));
    }
}
