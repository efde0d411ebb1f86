//! What both backends share for tenants, API keys and the audit log: the SQL
//! text (written with `?` placeholders; [`pg`] numbers them for PostgreSQL)
//! and the decoding of rows. JSON columns (`limits`, `signing_secrets`,
//! `detail`) are stored as text so that both backends hold the same bytes.

use std::sync::OnceLock;

use switchyard_core::identity::{ApiKeyRecord, AuditRecord, KeyLimits, Role, Tenant};

use crate::StoreError;

pub(crate) const KEY_COLUMNS: &str =
    "id, tenant_id, name, role, user_id, prefix, key_hash, limits, \
     signing_secrets, require_signature, expires_at_ms, revoked_at_ms, created_at_ms, created_by";
pub(crate) const TENANT_COLUMNS: &str = "id, name, monthly_budget_usd, limits, created_at_ms";
pub(crate) const AUDIT_COLUMNS: &str =
    "id, tenant_id, actor, action, target, detail, trace_id, created_at_ms";

/// `?` placeholders numbered `$1, $2, ...` for PostgreSQL. The SQL here has
/// no `?` inside literals.
pub(crate) fn pg(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A statement's PostgreSQL form, computed once.
macro_rules! pg_once {
    ($sql:expr) => {{
        static PG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        PG.get_or_init(|| $crate::identity::pg(&$sql)).as_str()
    }};
}
pub(crate) use pg_once;

pub(crate) fn insert_key_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    })
}

pub(crate) fn insert_audit_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!("INSERT INTO audit_logs ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
    })
}

/// The audit listing with its optional filters, newest first.
pub(crate) fn list_audit_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_logs WHERE tenant_id = ? \
             AND (? IS NULL OR action = ?) AND (? IS NULL OR actor = ?) \
             AND (? IS NULL OR created_at_ms >= ?) AND (? IS NULL OR created_at_ms < ?) \
             AND (? IS NULL OR id < ?) \
             ORDER BY id DESC LIMIT ?"
        )
    })
}

pub(crate) fn json_text<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("encoding JSON: {e}")))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &str,
) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(format!("{what}: {e}").into()))
}

/// Decoding shared by both backends (same column types in each).
pub(crate) trait RowExt {
    fn text(&self, c: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, c: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, c: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, c: &str) -> Result<Option<i64>, sqlx::Error>;
    fn opt_float(&self, c: &str) -> Result<Option<f64>, sqlx::Error>;
    fn boolean(&self, c: &str) -> Result<bool, sqlx::Error>;
    fn opt_bytes(&self, c: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;
}

macro_rules! row_ext {
    ($row:ty) => {
        impl $crate::identity::RowExt for $row {
            fn text(&self, c: &str) -> Result<String, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
            fn opt_text(&self, c: &str) -> Result<Option<String>, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
            fn int(&self, c: &str) -> Result<i64, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
            fn opt_int(&self, c: &str) -> Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
            fn opt_float(&self, c: &str) -> Result<Option<f64>, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
            fn boolean(&self, c: &str) -> Result<bool, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
            fn opt_bytes(&self, c: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
                sqlx::Row::try_get(self, c)
            }
        }
    };
}
row_ext!(sqlx::sqlite::SqliteRow);
row_ext!(sqlx::postgres::PgRow);

pub(crate) fn key_from_row(r: &impl RowExt) -> Result<ApiKeyRecord, sqlx::Error> {
    let role = r.text("role")?;
    Ok(ApiKeyRecord {
        id: r.text("id")?,
        tenant_id: r.text("tenant_id")?,
        name: r.text("name")?,
        role: Role::parse(&role)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown role {role}").into()))?,
        user_id: r.opt_text("user_id")?,
        prefix: r.text("prefix")?,
        key_hash: r.text("key_hash")?,
        limits: from_json::<KeyLimits>("limits", &r.text("limits")?)?,
        signing_secrets: match r.opt_text("signing_secrets")? {
            Some(t) => from_json("signing_secrets", &t)?,
            None => Vec::new(),
        },
        require_signature: r.boolean("require_signature")?,
        expires_at_ms: r.opt_int("expires_at_ms")?,
        revoked_at_ms: r.opt_int("revoked_at_ms")?,
        created_at_ms: r.int("created_at_ms")?,
        created_by: r.text("created_by")?,
    })
}

pub(crate) fn tenant_from_row(r: &impl RowExt) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: r.text("id")?,
        name: r.text("name")?,
        monthly_budget_usd: r.opt_float("monthly_budget_usd")?,
        limits: from_json("limits", &r.text("limits")?)?,
        created_at_ms: r.int("created_at_ms")?,
    })
}

pub(crate) fn audit_from_row(r: &impl RowExt) -> Result<AuditRecord, sqlx::Error> {
    Ok(AuditRecord {
        id: r.text("id")?,
        tenant_id: r.text("tenant_id")?,
        actor: r.text("actor")?,
        action: r.text("action")?,
        target: r.opt_text("target")?,
        detail: from_json("detail", &r.text("detail")?)?,
        trace_id: r.opt_text("trace_id")?,
        created_at_ms: r.int("created_at_ms")?,
    })
}

/// A statement as written (SQLite), as a `&'static str`.
macro_rules! lite_once {
    ($sql:expr) => {{
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SQL.get_or_init(|| $sql.to_string()).as_str()
    }};
}
pub(crate) use lite_once;

/// [`crate::IdentityStore`] for a backend, written once and expanded with
/// the backend's placeholder style (`lite_once` or `pg_once`).
macro_rules! identity_store {
    ($store:ty, $conv:ident) => {
    #[async_trait::async_trait]
    impl $crate::IdentityStore for $store {
        async fn create_tenant(
            &self,
            t: &switchyard_core::identity::Tenant,
        ) -> Result<bool, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!(format!(
                "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
            ));
            let r = sqlx::query(sql)
                .bind(&t.id)
                .bind(&t.name)
                .bind(t.monthly_budget_usd)
                .bind(json_text(&t.limits)?)
                .bind(t.created_at_ms)
                .execute(&self.writer)
                .await
                .context("creating a tenant")?;
            Ok(r.rows_affected() == 1)
        }

        async fn update_tenant(
            &self,
            before: &switchyard_core::identity::Tenant,
            t: &switchyard_core::identity::Tenant,
        ) -> Result<bool, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!("UPDATE tenants SET name = ?, monthly_budget_usd = ?, limits = ? WHERE id = ? AND name = ? AND (monthly_budget_usd = ? OR (monthly_budget_usd IS NULL AND ? IS NULL)) AND limits = ?");
            let r = sqlx::query(sql)
                .bind(&t.name)
                .bind(t.monthly_budget_usd)
                .bind(json_text(&t.limits)?)
                .bind(&t.id)
                .bind(&before.name)
                .bind(before.monthly_budget_usd)
                .bind(before.monthly_budget_usd)
                .bind(json_text(&before.limits)?)
                .execute(&self.writer)
                .await
                .context("updating a tenant")?;
            Ok(r.rows_affected() == 1)
        }

        async fn get_tenant(
            &self,
            id: &str,
        ) -> Result<Option<switchyard_core::identity::Tenant>, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!(format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?"));
            let row = sqlx::query(sql)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .context("reading a tenant")?;
            row.as_ref()
                .map(tenant_from_row)
                .transpose()
                .context("decoding a tenant")
        }

        async fn list_tenants(
            &self,
        ) -> Result<Vec<switchyard_core::identity::Tenant>, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!(format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id"));
            let rows = sqlx::query(sql)
                .fetch_all(&self.pool)
                .await
                .context("listing tenants")?;
            rows.iter()
                .map(tenant_from_row)
                .collect::<Result<_, _>>()
                .context("decoding tenants")
        }

        async fn ensure_user(
            &self,
            tenant_id: &str,
            user_id: &str,
            at_ms: i64,
        ) -> Result<(), $crate::StoreError> {
            let sql = $conv!("INSERT INTO users (tenant_id, id, created_at_ms) VALUES (?, ?, ?) ON CONFLICT (tenant_id, id) DO NOTHING");
            sqlx::query(sql)
                .bind(tenant_id)
                .bind(user_id)
                .bind(at_ms)
                .execute(&self.writer)
                .await
                .context("recording a user")?;
            Ok(())
        }

        async fn insert_api_key(
            &self,
            k: &switchyard_core::identity::ApiKeyRecord,
        ) -> Result<(), $crate::StoreError> {
            use $crate::identity::*;
            let secrets = if k.signing_secrets.is_empty() {
                None
            } else {
                Some(json_text(&k.signing_secrets)?)
            };
            sqlx::query($conv!(insert_key_sql()))
                .bind(&k.id)
                .bind(&k.tenant_id)
                .bind(&k.name)
                .bind(k.role.as_str())
                .bind(&k.user_id)
                .bind(&k.prefix)
                .bind(&k.key_hash)
                .bind(json_text(&k.limits)?)
                .bind(secrets)
                .bind(k.require_signature)
                .bind(k.expires_at_ms)
                .bind(k.revoked_at_ms)
                .bind(k.created_at_ms)
                .bind(&k.created_by)
                .execute(&self.writer)
                .await
                .context("storing an API key")?;
            Ok(())
        }

        async fn find_api_key_by_hash(
            &self,
            key_hash: &str,
        ) -> Result<Option<switchyard_core::identity::ApiKeyRecord>, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"));
            let row = sqlx::query(sql)
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await
                .context("looking up an API key")?;
            row.as_ref()
                .map(key_from_row)
                .transpose()
                .context("decoding an API key")
        }

        async fn get_api_key(
            &self,
            tenant_id: &str,
            id: &str,
        ) -> Result<Option<switchyard_core::identity::ApiKeyRecord>, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!(format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = ? AND id = ?"
            ));
            let row = sqlx::query(sql)
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .context("reading an API key")?;
            row.as_ref()
                .map(key_from_row)
                .transpose()
                .context("decoding an API key")
        }

        async fn list_api_keys(
            &self,
            tenant_id: &str,
        ) -> Result<Vec<switchyard_core::identity::ApiKeyRecord>, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!(format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = ? ORDER BY created_at_ms DESC, id DESC"
            ));
            let rows = sqlx::query(sql)
                .bind(tenant_id)
                .fetch_all(&self.pool)
                .await
                .context("listing API keys")?;
            rows.iter()
                .map(key_from_row)
                .collect::<Result<_, _>>()
                .context("decoding API keys")
        }

        async fn update_api_key(
            &self,
            before: &switchyard_core::identity::ApiKeyRecord,
            k: &switchyard_core::identity::ApiKeyRecord,
        ) -> Result<bool, $crate::StoreError> {
            use $crate::identity::*;
            let sql = $conv!("UPDATE api_keys SET name = ?, role = ?, limits = ? WHERE tenant_id = ? AND id = ? AND name = ? AND role = ? AND limits = ? AND revoked_at_ms IS NULL");
            let r = sqlx::query(sql)
                .bind(&k.name)
                .bind(k.role.as_str())
                .bind(json_text(&k.limits)?)
                .bind(&k.tenant_id)
                .bind(&k.id)
                .bind(&before.name)
                .bind(before.role.as_str())
                .bind(json_text(&before.limits)?)
                .execute(&self.writer)
                .await
                .context("updating an API key")?;
            Ok(r.rows_affected() == 1)
        }

        async fn revoke_api_key(
            &self,
            tenant_id: &str,
            id: &str,
            at_ms: i64,
        ) -> Result<bool, $crate::StoreError> {
            let sql = $conv!("UPDATE api_keys SET revoked_at_ms = ? WHERE tenant_id = ? AND id = ? AND revoked_at_ms IS NULL");
            let r = sqlx::query(sql)
                .bind(at_ms)
                .bind(tenant_id)
                .bind(id)
                .execute(&self.writer)
                .await
                .context("revoking an API key")?;
            Ok(r.rows_affected() == 1)
        }

        async fn count_api_keys(&self) -> Result<u64, $crate::StoreError> {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
                .fetch_one(&self.pool)
                .await
                .context("counting API keys")?;
            Ok(n.max(0) as u64)
        }

        async fn insert_audit(
            &self,
            rows: &[switchyard_core::identity::AuditRecord],
        ) -> Result<(), $crate::StoreError> {
            use $crate::identity::*;
            let mut tx = self.writer.begin().await.context("starting the audit transaction")?;
            for a in rows {
                sqlx::query($conv!(insert_audit_sql()))
                    .bind(&a.id)
                    .bind(&a.tenant_id)
                    .bind(&a.actor)
                    .bind(&a.action)
                    .bind(&a.target)
                    .bind(json_text(&a.detail)?)
                    .bind(&a.trace_id)
                    .bind(a.created_at_ms)
                    .execute(&mut *tx)
                    .await
                    .context("writing audit events")?;
            }
            tx.commit().await.context("committing audit events")
        }

        async fn list_audit(
            &self,
            tenant_id: &str,
            q: &switchyard_core::identity::AuditQuery,
        ) -> Result<Vec<switchyard_core::identity::AuditRecord>, $crate::StoreError> {
            use $crate::identity::*;
            let rows = sqlx::query($conv!(list_audit_sql()))
                .bind(tenant_id)
                .bind(&q.action)
                .bind(&q.action)
                .bind(&q.actor)
                .bind(&q.actor)
                .bind(q.since_ms)
                .bind(q.since_ms)
                .bind(q.until_ms)
                .bind(q.until_ms)
                .bind(&q.before_id)
                .bind(&q.before_id)
                .bind(i64::from(q.limit))
                .fetch_all(&self.pool)
                .await
                .context("listing audit events")?;
            rows.iter()
                .map(audit_from_row)
                .collect::<Result<_, _>>()
                .context("decoding audit events")
        }
    }
    };
}
pub(crate) use identity_store;

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            super::pg("a = ? AND (? IS NULL OR b = ?)"),
            "a = $1 AND ($2 IS NULL OR b = $3)"
        );
    }
}
