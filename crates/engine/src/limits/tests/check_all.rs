//! `check_all` — what the server calls on every request, one Lua script in
//! Redis — held to the in-memory limiter over random arrivals of several
//! subjects, each with its own `global` rate and class rates, sharing the
//! `global` key across classes as the server does (issue 4, item 6).

use super::*;

/// The classes a subject's request is counted in, besides `global`.
const CLASSES: [&str; 2] = ["chat", "bots"];

fn any_rate() -> impl Strategy<Value = Rate> {
    let count = 1u32..=20;
    let period = prop_oneof![Just(1u64), Just(60), Just(3_600), 1u64..=600];
    (count, period).prop_filter_map("valid rate", |(c, p)| Rate::new(c, secs(p)).ok())
}

/// One request: µs since the previous one, its subject, its class (`None`:
/// only `global`), whether the class key comes first, and its cost.
type Arrival = (u64, usize, Option<usize>, bool, u32);

/// Per subject the rates of `global` and each of [`CLASSES`]; and arrivals.
fn subjects_and_arrivals() -> impl Strategy<Value = (Vec<[Rate; 3]>, Vec<Arrival>)> {
    proptest::collection::vec([any_rate(), any_rate(), any_rate()], 1..=3).prop_flat_map(|rates| {
        let subjects = rates.len();
        let gap = prop_oneof![
            2 => Just(0u64),
            3 => 0u64..=2_000_000,
            2 => 0u64..=120_000_000,
            1 => 0u64..=4_000_000_000,
        ];
        let class = prop_oneof![1 => Just(None), 3 => (0..CLASSES.len()).prop_map(Some)];
        // Mostly 1, as the server spends; sometimes a peek (0) or a cost
        // beyond a small rate's count (an error on both).
        let cost = prop_oneof![6 => Just(1u32), 1 => Just(0u32), 1 => 2u32..=4];
        let arrival = (gap, 0..subjects, class, any::<bool>(), cost);
        (Just(rates), proptest::collection::vec(arrival, 1..80))
    })
}

/// The keys and rates of one request, in the order the arrival says.
fn checks(case: u64, rates: &[[Rate; 3]], arrival: &Arrival) -> Vec<(String, Rate)> {
    let (_, subject, class, class_first, _) = *arrival;
    let key = |name: &str| format!("case:{case}:s{subject}:{name}");
    let mut out = vec![(key("global"), rates[subject][0])];
    if let Some(c) = class {
        let pair = (key(CLASSES[c]), rates[subject][c + 1]);
        if class_first {
            out.insert(0, pair);
        } else {
            out.push(pair);
        }
    }
    out
}

/// A decision and the headers it would send.
type Answer = (Decision, Vec<(&'static str, String)>);

/// Decisions, with the headers each one's policy would send; or the error code.
fn outcome(result: Result<Vec<Decision>, LimitError>) -> Result<Vec<Answer>, &'static str> {
    result
        .map(|ds| ds.into_iter().map(|d| (d, d.headers("p"))).collect())
        .map_err(|e| e.code())
}

#[test]
fn memory_and_redis_check_all_take_identical_decisions_for_the_same_arrivals() {
    let Some(url) = redis_url() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = rt.block_on(redis_limiter(&url, &unique_namespace("prop-all")));
    let seq = AtomicU64::new(0);
    let mut runner = TestRunner::new(PropConfig {
        cases: 64,
        ..PropConfig::default()
    });

    let result = runner.run(&subjects_and_arrivals(), |(rates, arrivals)| {
        let case = seq.fetch_add(1, Ordering::Relaxed);
        let clock = ManualClock::starting_at_us(REPLAY_START_US);
        let memory = MemoryLimiter::with_clock(Arc::new(clock.clone()));
        rt.block_on(async {
            let mut now = REPLAY_START_US;
            let mut used = std::collections::BTreeMap::new();
            for (i, arrival) in arrivals.iter().enumerate() {
                now += arrival.0;
                clock.set_us(now);
                let owned = checks(case, &rates, arrival);
                let checks: Vec<(&str, Rate)> =
                    owned.iter().map(|(k, r)| (k.as_str(), *r)).collect();
                let cost = arrival.4;
                let m = outcome(memory.check_all(&checks, cost).await);
                let r = outcome(redis.run_all(&checks, cost, Some(now)).await);
                prop_assert_eq!(
                    &m,
                    &r,
                    "arrival {} {:?} at +{}µs",
                    i,
                    checks,
                    now - REPLAY_START_US
                );
                used.extend(owned);
            }
            // Both hold the same state for every key, spent or not.
            for (key, rate) in &used {
                let peek = [(key.as_str(), *rate)];
                prop_assert_eq!(
                    outcome(memory.check_all(&peek, 0).await),
                    outcome(redis.run_all(&peek, 0, Some(now)).await),
                    "{} at the end",
                    key
                );
            }
            Ok::<(), TestCaseError>(())
        })
    });

    rt.block_on(redis.reset("")).unwrap();
    if let Err(e) = result {
        panic!("{e}");
    }
}
