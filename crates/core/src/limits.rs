//! Rate-limit vocabulary: a [`Rate`] such as `20/min`, written the same way in
//! the configuration, in per-key limits and in the admin API, and the
//! `[limits]` configuration schema ([`RateLimitConfig`]).
//!
//! Parsing lives here, beside the other config types, so that every layer
//! agrees on what `"100/5min"` means; the limiters themselves live in `engine`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// The longest period a rate may have. Bounding it keeps every limiter's
/// microsecond arithmetic far from overflow (and exact in Redis's Lua
/// numbers, which are doubles).
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

/// The largest token-per-minute limit a key may carry (what the
/// `x-ratelimit-*-tokens` figures can hold).
pub const MAX_TOKENS_PER_MINUTE: u64 = u32::MAX as u64;

/// Units of a token limit's rate, at most, a minute: its emission interval
/// is then at least 100 µs, so rounding it to whole microseconds costs
/// under 1 %.
const MAX_TOKEN_UNITS_PER_MINUTE: u64 = 600_000;

/// A token-per-minute limit as a GCRA rate. Tokens are counted in units of
/// `unit` tokens (1 up to 600,000 a minute; more for larger limits), since a
/// rate's interval is a whole number of microseconds: 60 million tokens a
/// minute counted one by one would have an interval of 1 µs, and 45 million
/// one of 1.33 µs, rounded to 2 (a third under the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRate {
    pub rate: Rate,
    /// Tokens per unit of `rate`.
    pub unit: u64,
    /// The limit as given: tokens per minute.
    pub per_minute: u64,
}

impl TokenRate {
    /// `None` for 0 or more than [`MAX_TOKENS_PER_MINUTE`].
    pub fn per_minute(tokens: u64) -> Option<Self> {
        if tokens == 0 || tokens > MAX_TOKENS_PER_MINUTE {
            return None;
        }
        let unit = tokens.div_ceil(MAX_TOKEN_UNITS_PER_MINUTE);
        let units = u32::try_from(tokens / unit).ok()?;
        let rate = Rate::new(units, Duration::from_secs(60)).ok()?;
        Some(Self {
            rate,
            unit,
            per_minute: tokens,
        })
    }

    /// Units of the rate that `tokens` cost (rounded up: never under).
    pub fn units(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.unit)
    }

    /// Units of the rate as tokens, within the limit.
    pub fn tokens(&self, units: u32) -> u32 {
        let tokens = (u64::from(units) * self.unit).min(self.per_minute);
        u32::try_from(tokens).unwrap_or(u32::MAX)
    }
}

/// `count` requests per `period`, e.g. `20/min`; a fresh subject may send
/// all `count` at once, after which one more is allowed every
/// `period / count`.
///
/// Fields are private so that every `Rate` holds its invariants: count ≥ 1,
/// 0 < period ≤ [`MAX_PERIOD`], and at most one request per microsecond
/// (limiters divide by the emission interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    count: u32,
    period: Duration,
}

/// Why a rate was refused; the message quotes the input and shows the form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("invalid rate {0:?}: expected COUNT/PERIOD such as 20/min, 10/hour or 100/5min")]
    Syntax(String),
    #[error("invalid rate {input:?}: unknown period unit {unit:?}; use s, min, hour or day (e.g. 20/min)")]
    Unit { input: String, unit: String },
    #[error("invalid rate {0:?}: the count must be at least 1")]
    ZeroCount(String),
    #[error("invalid rate {0:?}: the period must be longer than zero")]
    ZeroPeriod(String),
    #[error("invalid rate {0:?}: the period must be at most 366 days")]
    PeriodTooLong(String),
    #[error("invalid rate {0:?}: more than one request per microsecond is not supported")]
    TooFine(String),
}

impl Rate {
    /// A validated rate; `input` in errors is the rate written canonically.
    pub fn new(count: u32, period: Duration) -> Result<Self, RateError> {
        let shown = || format!("{count}/{}s", period.as_secs_f64());
        if count == 0 {
            return Err(RateError::ZeroCount(shown()));
        }
        if period.is_zero() {
            return Err(RateError::ZeroPeriod(shown()));
        }
        if period > MAX_PERIOD {
            return Err(RateError::PeriodTooLong(shown()));
        }
        if period.as_micros() < u128::from(count) {
            return Err(RateError::TooFine(shown()));
        }
        Ok(Self { count, period })
    }

    /// Requests admitted per period, and the size of the burst.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// The period in whole microseconds (≤ [`MAX_PERIOD`], so it fits).
    pub fn period_us(&self) -> u64 {
        u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX)
    }

    /// GCRA's emission interval T = period / count, in whole microseconds
    /// (at least 1 by construction), rounded up when the period does not
    /// divide evenly: the sustained rate, 1/T, is then never above the
    /// configured one (rounded down, 700,000/s would admit 1,000,000/s).
    pub fn emission_interval_us(&self) -> u64 {
        self.period_us().div_ceil(u64::from(self.count))
    }

    /// The period in whole seconds, rounded up: the `w` of `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        let secs = self.period.as_secs();
        if self.period.subsec_nanos() > 0 {
            secs + 1
        } else {
            secs
        }
    }
}

/// Period units, longest first so that [`fmt::Display`] picks the largest
/// that divides the period evenly.
const UNITS: [(&str, u64); 4] = [("day", 86_400), ("hour", 3_600), ("min", 60), ("s", 1)];

fn unit_secs(unit: &str) -> Option<u64> {
    match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => Some(1),
        "m" | "min" | "mins" | "minute" | "minutes" => Some(60),
        "h" | "hr" | "hour" | "hours" => Some(3_600),
        "d" | "day" | "days" => Some(86_400),
        _ => None,
    }
}

impl FromStr for Rate {
    type Err = RateError;

    /// Accepts `COUNT/UNIT` and `COUNT/<k>UNIT`: `20/min`, `10/hour`, `100/s`,
    /// `5/sec`, `30/minute`, `1000/day`, `60/m`, `3/h`, `7/d`, `100/5min`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let syntax = || RateError::Syntax(input.to_owned());
        let (count, per) = input.split_once('/').ok_or_else(syntax)?;
        let (count, per) = (count.trim(), per.trim());
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let count: u32 = count.parse().map_err(|_| syntax())?;
        let digits = per.bytes().take_while(u8::is_ascii_digit).count();
        let (mult, unit) = per.split_at(digits);
        let unit = unit.trim();
        let mult: u64 = if mult.is_empty() {
            1
        } else {
            mult.parse().map_err(|_| syntax())?
        };
        if unit.is_empty() {
            return Err(syntax());
        }
        let secs = unit_secs(&unit.to_ascii_lowercase()).ok_or_else(|| RateError::Unit {
            input: input.to_owned(),
            unit: unit.to_owned(),
        })?;
        let period_secs = secs
            .checked_mul(mult)
            .ok_or_else(|| RateError::PeriodTooLong(input.to_owned()))?;
        // Re-label Rate::new's errors with what the user actually wrote.
        Rate::new(count, Duration::from_secs(period_secs)).map_err(|e| match e {
            RateError::ZeroCount(_) => RateError::ZeroCount(input.to_owned()),
            RateError::ZeroPeriod(_) => RateError::ZeroPeriod(input.to_owned()),
            RateError::PeriodTooLong(_) => RateError::PeriodTooLong(input.to_owned()),
            RateError::TooFine(_) => RateError::TooFine(input.to_owned()),
            other => other,
        })
    }
}

impl fmt::Display for Rate {
    /// The canonical form: the largest unit that divides the period, e.g.
    /// `20/min`, `100/5min`, `7/day`; sub-second periods in microseconds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.period.subsec_nanos() == 0 {
            let secs = self.period.as_secs();
            for (name, unit) in UNITS {
                if secs.is_multiple_of(unit) {
                    let k = secs / unit;
                    return if k == 1 {
                        write!(f, "{}/{name}", self.count)
                    } else {
                        write!(f, "{}/{k}{name}", self.count)
                    };
                }
            }
        }
        write!(f, "{}/{}us", self.count, self.period_us())
    }
}

impl TryFrom<String> for Rate {
    type Error = RateError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> Self {
        r.to_string()
    }
}

/// The `[rate_limits]` section: request rates per route class, per-tenant
/// overrides, the limit on authentication failures, and where the shared
/// state lives.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Off switch for every request-rate limit (auth failures included).
    pub enabled: bool,
    /// Route class (`chat`, `bots`, `orchestrate`, `global`, `embeddings`,
    /// `admin`, …) → rate per subject (key, else user, else tenant). Classes
    /// given in the file are merged over the defaults, so naming one does
    /// not drop the others.
    #[serde(deserialize_with = "classes_over_defaults")]
    pub classes: BTreeMap<String, Rate>,
    /// Failed authentications allowed per client IP.
    pub auth_failures: Rate,
    /// Tenant id → class → rate, overriding `classes` for that tenant.
    pub tenants: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Shared state for every instance (`redis://…`); in memory when unset.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_redis_url_masked"
    )]
    pub redis_url: Option<String>,
}

/// The route classes requests are counted in (`global` covers them all).
pub const CLASSES: [&str; 6] = [
    "admin",
    "bots",
    "chat",
    "embeddings",
    "global",
    "orchestrate",
];

/// `Err` with what is expected when `name` is not one of [`CLASSES`]: a
/// limit set on a misspelt class would silently limit nothing.
pub fn check_class(name: &str) -> Result<(), String> {
    if CLASSES.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "unknown rate limit class; expected one of {}",
            CLASSES.join(", ")
        ))
    }
}

fn default_classes() -> BTreeMap<String, Rate> {
    let rate = |count, secs| Rate {
        count,
        period: Duration::from_secs(secs),
    };
    [
        ("chat", rate(20, 60)),
        ("bots", rate(10, 3_600)),
        ("orchestrate", rate(30, 60)),
        ("global", rate(100, 60)),
        ("embeddings", rate(60, 60)),
        ("admin", rate(60, 60)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn classes_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Rate>, D::Error> {
    let mut classes = default_classes();
    classes.extend(BTreeMap::<String, Rate>::deserialize(d)?);
    Ok(classes)
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            classes: default_classes(),
            auth_failures: Rate {
                count: 10,
                period: Duration::from_secs(60),
            },
            tenants: BTreeMap::new(),
            redis_url: None,
        }
    }
}

impl RateLimitConfig {
    /// The configured rate of `class` for `tenant_id`: the tenant's override,
    /// else the class default; `None` when the class is not limited. Per-key
    /// limits, which sit above both, are the caller's to apply first.
    pub fn rate_for(&self, tenant_id: &str, class: &str) -> Option<Rate> {
        self.tenants
            .get(tenant_id)
            .and_then(|t| t.get(class))
            .or_else(|| self.classes.get(class))
            .copied()
    }
}

/// `redis://user:secret@host` prints as `redis://user:[redacted]@host`, so
/// `config show` never reveals the password.
fn serialize_redis_url_masked<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => s.serialize_str(&crate::config::mask_url_password(url)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::mask_url_password;

    #[test]
    fn the_emission_interval_rounds_up_so_the_rate_is_never_exceeded() {
        let t = |count, secs| {
            Rate::new(count, Duration::from_secs(secs))
                .unwrap()
                .emission_interval_us()
        };
        assert_eq!(t(20, 60), 3_000_000);
        assert_eq!(t(7, 1), 142_858); // 142,857.14…
        assert_eq!(t(700_000, 1), 2); // 1.43: rounded down it would admit 1M/s
        assert_eq!(t(60_000_000, 60), 1);
    }

    #[test]
    fn a_token_limit_counts_in_units_fine_enough_to_hold_within_one_percent() {
        assert_eq!(TokenRate::per_minute(0), None);
        assert_eq!(TokenRate::per_minute(u64::from(u32::MAX) + 1), None);
        for tpm in [
            1u64,
            5,
            40_000,
            600_000,
            600_001,
            45_000_000,
            150_000_000,
            u64::from(u32::MAX),
        ] {
            let r = TokenRate::per_minute(tpm).unwrap();
            // The sustained rate, in tokens a minute: 60 s / T units of `unit`.
            let sustained = 60_000_000 / r.rate.emission_interval_us() * r.unit;
            assert!(sustained <= tpm, "{tpm}: {sustained}");
            assert!(sustained as f64 >= 0.99 * tpm as f64, "{tpm}: {sustained}");
            assert_eq!(
                r.tokens(r.rate.count()) as u64,
                tpm.min(r.unit * u64::from(r.rate.count()))
            );
        }
        let r = TokenRate::per_minute(150_000_000).unwrap();
        assert_eq!((r.unit, r.rate.count()), (250, 600_000));
        assert_eq!(
            (r.units(0), r.units(1), r.units(250), r.units(251)),
            (0, 1, 1, 2)
        );
    }

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn every_documented_rate_form_parses() {
        let cases = [
            ("20/min", 20, 60),
            ("10/hour", 10, 3_600),
            ("100/s", 100, 1),
            ("5/sec", 5, 1),
            ("30/minute", 30, 60),
            ("1000/day", 1000, 86_400),
            ("60/m", 60, 60),
            ("3/h", 3, 3_600),
            ("7/d", 7, 86_400),
            ("100/5min", 100, 300),
            (" 2 / 10s ", 2, 10),
            ("4/Hours", 4, 3_600),
        ];
        for (input, count, secs) in cases {
            let r = rate(input);
            assert_eq!(
                (r.count(), r.period()),
                (count, Duration::from_secs(secs)),
                "{input}"
            );
        }
    }

    #[test]
    fn rates_print_in_canonical_form_and_round_trip() {
        for (input, shown) in [
            ("20/minute", "20/min"),
            ("10/h", "10/hour"),
            ("100/sec", "100/s"),
            ("7/d", "7/day"),
            ("100/5min", "100/5min"),
            ("5/90s", "5/90s"),
            ("1/24h", "1/day"),
        ] {
            let r = rate(input);
            assert_eq!(r.to_string(), shown);
            assert_eq!(rate(shown), r);
        }
    }

    #[test]
    fn malformed_rates_say_what_was_expected() {
        for bad in [
            "",
            "20",
            "20/",
            "/min",
            "x/min",
            "-1/min",
            "20/5",
            "1.5/min",
            "20 per min",
        ] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid rate {:?}: expected COUNT/PERIOD such as 20/min, 10/hour or 100/5min",
                    bad.trim()
                )
            );
        }
    }

    #[test]
    fn unknown_units_zero_counts_and_absurd_periods_are_refused() {
        assert_eq!(
            "20/fortnight".parse::<Rate>(),
            Err(RateError::Unit {
                input: "20/fortnight".into(),
                unit: "fortnight".into()
            })
        );
        assert_eq!(
            "0/min".parse::<Rate>(),
            Err(RateError::ZeroCount("0/min".into()))
        );
        assert_eq!(
            "5/0min".parse::<Rate>(),
            Err(RateError::ZeroPeriod("5/0min".into()))
        );
        assert_eq!(
            "5/367d".parse::<Rate>(),
            Err(RateError::PeriodTooLong("5/367d".into()))
        );
        assert_eq!(
            "5/99999999999999999999d".parse::<Rate>(),
            Err(RateError::Syntax("5/99999999999999999999d".into()))
        );
        assert_eq!(
            "2000000/s".parse::<Rate>(),
            Err(RateError::TooFine("2000000/s".into()))
        );
        assert!("1000000/s".parse::<Rate>().is_ok());
        assert_eq!(
            "0/min".parse::<Rate>().unwrap_err().to_string(),
            "invalid rate \"0/min\": the count must be at least 1"
        );
    }

    #[test]
    fn emission_interval_is_period_over_count_in_microseconds() {
        assert_eq!(rate("20/min").emission_interval_us(), 3_000_000);
        assert_eq!(
            rate("7/d").emission_interval_us(),
            (86_400_000_000_u64).div_ceil(7)
        );
        assert_eq!(rate("1000000/s").emission_interval_us(), 1);
        assert_eq!(rate("100/5min").window_secs(), 300);
    }

    #[test]
    fn default_config_has_the_documented_classes() {
        let c = RateLimitConfig::default();
        assert!(c.enabled);
        let shown: Vec<String> = c.classes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            shown,
            [
                "admin=60/min",
                "bots=10/hour",
                "chat=20/min",
                "embeddings=60/min",
                "global=100/min",
                "orchestrate=30/min"
            ]
        );
        assert_eq!(c.auth_failures, rate("10/min"));
        assert!(c.tenants.is_empty());
        assert_eq!(c.redis_url, None);
    }

    #[test]
    fn config_reads_from_toml_and_tenant_overrides_win() {
        let c: RateLimitConfig = toml::from_str(
            r#"
            classes = { chat = "5/min", bots = "1/day" }
            auth_failures = "3/min"
            redis_url = "redis://127.0.0.1:6379/"
            [tenants.acme]
            chat = "100/min"
            "#,
        )
        .unwrap();
        assert_eq!(c.rate_for("acme", "chat"), Some(rate("100/min")));
        assert_eq!(c.rate_for("acme", "bots"), Some(rate("1/day")));
        assert_eq!(c.rate_for("other", "chat"), Some(rate("5/min")));
        assert_eq!(
            c.rate_for("other", "global"),
            Some(rate("100/min")),
            "classes in the file merge over the defaults"
        );
        assert_eq!(c.rate_for("other", "unknown"), None);
        assert_eq!(c.auth_failures, rate("3/min"));
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379/"));
    }

    #[test]
    fn config_errors_name_the_field_and_the_expected_form() {
        let err = toml::from_str::<RateLimitConfig>(r#"classes = { chat = "20 per minute" }"#)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("expected COUNT/PERIOD such as 20/min"),
            "{err}"
        );
        let err = toml::from_str::<RateLimitConfig>("enable = false").unwrap_err();
        assert!(err.to_string().contains("unknown field `enable`"), "{err}");
    }

    #[test]
    fn config_round_trips_through_toml_with_rates_as_strings() {
        let c = RateLimitConfig::default();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("chat = \"20/min\""), "{text}");
        let back: RateLimitConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn redis_password_is_masked_when_config_is_shown() {
        let c = RateLimitConfig {
            redis_url: Some("redis://app:hunter2@cache:6379/0".into()),
            ..RateLimitConfig::default()
        };
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("redis://app:[redacted]@cache:6379/0"),
            "{text}"
        );
        assert_eq!(
            mask_url_password("redis://hunter2@cache/"),
            "redis://[redacted]@cache/"
        );
        assert_eq!(mask_url_password("redis://cache/"), "redis://cache/");
        // A Unix socket's password comes in the query.
        for url in [
            "redis+unix:///tmp/redis.sock?db=0&pass=hunter2",
            "unix:///tmp/redis.sock?pass=hunter2",
        ] {
            let masked = mask_url_password(url);
            assert!(
                !masked.contains("hunter2") && masked.contains("pass=[redacted]"),
                "{masked}"
            );
        }
        assert_eq!(
            mask_url_password("rediss://hunter2@cache:6380"),
            "rediss://[redacted]@cache:6380"
        );
    }
}
