//! The embedded migrations, one list per backend, applied in version order.

pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage_logs",
        sql: include_str!("../migrations/sqlite/0001_usage_logs.sql"),
    },
    Migration {
        version: 2,
        name: "provider_health",
        sql: include_str!("../migrations/sqlite/0002_provider_health.sql"),
    },
    Migration {
        version: 3,
        name: "drop_usage_trace_index",
        sql: include_str!("../migrations/sqlite/0003_drop_usage_trace_index.sql"),
    },
    Migration {
        version: 4,
        name: "identity",
        sql: include_str!("../migrations/sqlite/0004_identity.sql"),
    },
    Migration {
        version: 5,
        name: "sessions",
        sql: include_str!("../migrations/sqlite/0005_sessions.sql"),
    },
    Migration {
        version: 6,
        name: "idempotency_owner",
        sql: include_str!("../migrations/sqlite/0006_idempotency_owner.sql"),
    },
    Migration {
        version: 7,
        name: "bus_events_user",
        sql: include_str!("../migrations/sqlite/0007_bus_events_user.sql"),
    },
    Migration {
        version: 8,
        name: "usage_trace",
        sql: include_str!("../migrations/sqlite/0008_usage_trace.sql"),
    },
    Migration {
        version: 9,
        name: "usage_cache_tokens",
        sql: include_str!("../migrations/sqlite/0009_usage_cache_tokens.sql"),
    },
    Migration {
        version: 10,
        name: "log_retention",
        sql: include_str!("../migrations/sqlite/0010_log_retention.sql"),
    },
];

pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage_logs",
        sql: include_str!("../migrations/postgres/0001_usage_logs.sql"),
    },
    Migration {
        version: 2,
        name: "provider_health",
        sql: include_str!("../migrations/postgres/0002_provider_health.sql"),
    },
    Migration {
        version: 3,
        name: "drop_usage_trace_index",
        sql: include_str!("../migrations/postgres/0003_drop_usage_trace_index.sql"),
    },
    Migration {
        version: 4,
        name: "identity",
        sql: include_str!("../migrations/postgres/0004_identity.sql"),
    },
    Migration {
        version: 5,
        name: "sessions",
        sql: include_str!("../migrations/postgres/0005_sessions.sql"),
    },
    Migration {
        version: 6,
        name: "idempotency_owner",
        sql: include_str!("../migrations/postgres/0006_idempotency_owner.sql"),
    },
    Migration {
        version: 7,
        name: "bus_events_user",
        sql: include_str!("../migrations/postgres/0007_bus_events_user.sql"),
    },
    Migration {
        version: 8,
        name: "usage_trace",
        sql: include_str!("../migrations/postgres/0008_usage_trace.sql"),
    },
    Migration {
        version: 9,
        name: "usage_cache_tokens",
        sql: include_str!("../migrations/postgres/0009_usage_cache_tokens.sql"),
    },
    Migration {
        version: 10,
        name: "log_retention",
        sql: include_str!("../migrations/postgres/0010_log_retention.sql"),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_migration_versions_in_order() {
        let s: Vec<(i64, &str)> = SQLITE.iter().map(|m| (m.version, m.name)).collect();
        let p: Vec<(i64, &str)> = POSTGRES.iter().map(|m| (m.version, m.name)).collect();
        assert_eq!(s, p);
        assert!(s.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
