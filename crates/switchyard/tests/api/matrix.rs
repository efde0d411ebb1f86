//! The authorization matrix (issue 4, Tests): every method and path the
//! router serves, for anonymous, a user of tenant A, a user of tenant B, a
//! service key of A acting for A's user, an admin of A, an admin of B and the
//! operator, against resources of tenant A. For every cell: the exact status;
//! that nobody outside tenant A sees anything of A's; that what an outsider
//! is told about A's resources is exactly what it is told about resources
//! that do not exist (404, never a 403 with details); and that an outsider's
//! request changed nothing of A's.

use reqwest::Method;
use serde_json::{json, Value};
use switchyard_testkit::TestApp;

use crate::helpers::{app, chat_body};

const OPERATOR: &str = "matrix-bootstrap-admin-key-0123456789abcdef0123";
/// What user A writes in its session: no body an outsider gets may hold it.
const NOTE: &str = "note-only-tenant-a-may-read";
const USER_A: &str = "ua";
const TENANT_A: &str = "tenant-a";

/// Fast trace events, limits nobody here reaches (the matrix's own requests
/// are not what it tests), a retired path still served and one gone.
const CONFIG: &str = "[events]\nflush_interval_ms = 20\n\n\
    [rate_limits.classes]\nglobal = \"100000/min\"\nchat = \"100000/min\"\n\
    embeddings = \"100000/min\"\nadmin = \"100000/min\"\nbots = \"100000/hour\"\n\n\
    [[sessions.retired_paths]]\npath = \"/functions/v1/chatting\"\nsunset = \"2999-01-01\"\n\n\
    [[sessions.retired_paths]]\npath = \"/functions/v1/old-chat\"\nsunset = \"2020-01-01\"\n";

/// The columns of the matrix, in order.
const WHO: [&str; 7] = [
    "anonymous",
    "user A",
    "user B",
    "service A",
    "admin A",
    "admin B",
    "operator",
];

/// Callers who must learn nothing of tenant A.
fn outsider(who: &str) -> bool {
    matches!(who, "anonymous" | "user B" | "admin B")
}

/// A credential and the user it acts for (`x-switchyard-user`).
#[derive(Clone)]
struct Caller {
    key: Option<String>,
    acting_for: Option<&'static str>,
}

struct Answer {
    status: u16,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| Value::String(self.text.clone()))
    }
}

async fn call(
    app: &TestApp,
    caller: &Caller,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Answer {
    let mut req = app
        .client
        .request(method, app.url(path))
        .header("accept", "application/json");
    if let Some(k) = &caller.key {
        req = req.bearer_auth(k);
    }
    if let Some(u) = caller.acting_for {
        req = req.header("x-switchyard-user", u);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    Answer { status, text }
}

/// Tenant A's resources that a row acts on; the names in `{…}` in a row's
/// path and body.
#[derive(Clone, Debug)]
struct Fixture {
    bot: String,
    session: String,
    /// The assistant's reply in `session`.
    message: String,
    trace: String,
    user: String,
    /// A key of tenant A that no caller uses.
    key: String,
    tenant: String,
}

impl Fixture {
    const NAMES: [&'static str; 7] = [
        "{bot}",
        "{session}",
        "{message}",
        "{trace}",
        "{user}",
        "{key}",
        "{tenant}",
    ];

    /// Resources that do not exist, for the same rows.
    fn ghost() -> Self {
        let id = || switchyard_core::usage::new_id();
        Self {
            bot: id(),
            session: id(),
            message: id(),
            trace: id().replace('-', "")[..32].to_owned(),
            user: "ghost-user".into(),
            key: id(),
            tenant: "tenant-ghost".into(),
        }
    }

    fn pairs(&self) -> [(&'static str, &str); 7] {
        let values = [
            &self.bot,
            &self.session,
            &self.message,
            &self.trace,
            &self.user,
            &self.key,
            &self.tenant,
        ];
        let mut i = 0;
        Self::NAMES.map(|name| {
            i += 1;
            (name, values[i - 1].as_str())
        })
    }

    fn fill(&self, template: &str) -> String {
        self.pairs()
            .iter()
            .fold(template.to_owned(), |s, (name, value)| {
                s.replace(name, value)
            })
    }

    /// `text` with `self`'s values written as `other`'s.
    fn rewrite_as(&self, other: &Fixture, text: &str) -> String {
        self.pairs()
            .iter()
            .zip(other.pairs())
            .fold(text.to_owned(), |s, ((_, mine), (_, theirs))| {
                s.replace(mine, theirs)
            })
    }
}

/// One row: a method and path (with `{…}` names of A's resources), a body,
/// the status for each column of [`WHO`], and what an insider's success
/// must show (a `{…}` name, or [`NOTE`]).
struct Row {
    method: Method,
    path: &'static str,
    body: Option<Value>,
    want: [u16; 7],
    /// Destructive: each cell gets resources of its own.
    fresh: bool,
    shows: Option<&'static str>,
}

fn row(method: Method, path: &'static str, body: Option<Value>, want: [u16; 7]) -> Row {
    Row {
        method,
        path,
        body,
        want,
        fresh: false,
        shows: None,
    }
}

impl Row {
    fn fresh(mut self) -> Self {
        self.fresh = true;
        self
    }

    fn shows(mut self, what: &'static str) -> Self {
        self.shows = Some(what);
        self
    }

    /// Whether the row names one of A's resources.
    fn targets_a(&self) -> bool {
        let body = self.body.as_ref().map(Value::to_string).unwrap_or_default();
        Fixture::NAMES
            .iter()
            .any(|name| self.path.contains(name) || body.contains(name))
    }

    /// Whether `who` works in tenant A for this row: A's own callers, and
    /// the operator where the row names tenant A.
    fn insider(&self, who: &str) -> bool {
        let names_tenant = self.path.contains("{tenant}")
            || self
                .body
                .as_ref()
                .is_some_and(|b| b.to_string().contains("{tenant}"));
        matches!(who, "user A" | "service A" | "admin A") || (who == "operator" && names_tenant)
    }

    fn request(&self, fx: &Fixture) -> (String, Option<Value>) {
        let body = self
            .body
            .as_ref()
            .map(|b| serde_json::from_str(&fx.fill(&b.to_string())).unwrap());
        (fx.fill(self.path), body)
    }
}

/// Every route, in the order the matrix runs them: writes that leave the
/// shared resources in place first, destructive ones (with resources of
/// their own per cell) last.
fn rows() -> Vec<Row> {
    use Method as M;
    const ANY: [u16; 7] = [401, 200, 200, 200, 200, 200, 200];
    const ADMINS: [u16; 7] = [401, 403, 403, 403, 200, 200, 200];
    // Only A's admin and the operator (naming tenant A) reach A's things.
    const A_ADMIN_OR_OPERATOR: [u16; 7] = [401, 403, 403, 403, 200, 404, 200];
    // The operator not naming tenant A looks in its own tenant.
    const A_ADMIN_ONLY: [u16; 7] = [401, 403, 403, 403, 200, 404, 404];
    // A's session: its user, the service acting for users, A's admin.
    const A_SESSION: [u16; 7] = [401, 200, 404, 200, 200, 404, 404];
    const PUBLIC: [u16; 7] = [200; 7];
    let chat = json!({"session_id": "{session}", "content": "hi"});
    vec![
        // ---- bots
        row(
            M::POST,
            "/v1/bots",
            Some(json!({"name": "n", "model": "gpt-4o-mini"})),
            [401, 403, 403, 201, 201, 201, 201],
        ),
        row(M::GET, "/v1/bots", None, ANY).shows("{bot}"),
        row(
            M::GET,
            "/v1/bots/{bot}",
            None,
            [401, 200, 404, 200, 200, 404, 404],
        )
        .shows("{bot}"),
        row(
            M::PATCH,
            "/v1/bots/{bot}",
            Some(json!({"name": "renamed"})),
            [401, 403, 403, 200, 200, 404, 404],
        ),
        // ---- sessions, messages, state, traces, data rights
        row(
            M::POST,
            "/v1/sessions",
            Some(json!({"bot_id": "{bot}"})),
            [401, 201, 404, 201, 201, 404, 404],
        ),
        row(M::GET, "/v1/sessions", None, ANY).shows("{session}"),
        row(M::GET, "/v1/sessions/{session}", None, A_SESSION).shows("{session}"),
        row(M::GET, "/v1/sessions/{session}/messages", None, A_SESSION).shows(NOTE),
        row(
            M::POST,
            "/v1/sessions/{session}/messages",
            Some(json!({"content": "hi"})),
            A_SESSION,
        ),
        row(
            M::GET,
            "/v1/sessions/{session}/messages/{message}/events",
            None,
            A_SESSION,
        )
        .shows("chat.done"),
        row(M::GET, "/v1/sessions/{session}/state", None, A_SESSION).shows("{session}"),
        row(
            M::PATCH,
            "/v1/sessions/{session}/state",
            Some(json!({"k": 1})),
            A_SESSION,
        ),
        row(M::GET, "/v1/traces/{trace}", None, A_SESSION).shows("{session}"),
        row(
            M::GET,
            "/v1/users/{user}/export",
            None,
            [401, 403, 403, 200, 200, 404, 404],
        )
        .shows(NOTE),
        // ---- the Supabase function paths, current and retired
        row(M::POST, "/functions/v1/chat", Some(chat.clone()), A_SESSION),
        row(
            M::POST,
            "/functions/v1/embed",
            Some(json!({"input": "x", "model": "text-embedding-3-small"})),
            ANY,
        ),
        row(
            M::POST,
            "/functions/v1/chatting",
            Some(chat.clone()),
            A_SESSION,
        ),
        row(
            M::POST,
            "/functions/v1/old-chat",
            Some(chat),
            [401, 410, 410, 410, 410, 410, 410],
        ),
        // ---- the OpenAI and Anthropic APIs
        row(
            M::POST,
            "/v1/chat/completions",
            Some(chat_body("gpt-4o-mini")),
            ANY,
        ),
        row(
            M::POST,
            "/v1/embeddings",
            Some(json!({"model": "text-embedding-3-small", "input": "x"})),
            ANY,
        ),
        row(
            M::POST,
            "/v1/messages",
            Some(json!({"model": "gpt-4o-mini", "max_tokens": 10,
                        "messages": [{"role": "user", "content": "hi"}]})),
            ANY,
        ),
        row(
            M::POST,
            "/v1/messages/count_tokens",
            Some(json!({"model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "hi"}]})),
            ANY,
        ),
        row(M::GET, "/v1/models", None, ANY),
        row(M::GET, "/v1/models/gpt-4o-mini", None, ANY),
        // ---- administration
        // Every tenant's traffic: the operator's alone.
        row(
            M::GET,
            "/v1/admin/providers",
            None,
            [401, 403, 403, 403, 403, 403, 200],
        ),
        row(M::GET, "/v1/admin/keys", None, ADMINS),
        row(
            M::GET,
            "/v1/admin/keys?tenant_id={tenant}",
            None,
            A_ADMIN_OR_OPERATOR,
        )
        .shows("{key}"),
        row(
            M::POST,
            "/v1/admin/keys",
            Some(json!({"name": "n"})),
            [401, 403, 403, 403, 201, 201, 201],
        ),
        row(
            M::POST,
            "/v1/admin/keys",
            Some(json!({"name": "n", "tenant_id": "{tenant}"})),
            [401, 403, 403, 403, 201, 404, 201],
        ),
        row(
            M::PATCH,
            "/v1/admin/keys/{key}",
            Some(json!({"name": "renamed"})),
            A_ADMIN_ONLY,
        ),
        row(
            M::PATCH,
            "/v1/admin/keys/{key}?tenant_id={tenant}",
            Some(json!({"name": "renamed again"})),
            A_ADMIN_OR_OPERATOR,
        ),
        row(
            M::POST,
            "/v1/admin/tenants",
            Some(json!({"id": "t-new"})),
            [401, 403, 403, 403, 403, 403, 201],
        ),
        row(M::GET, "/v1/admin/tenants", None, ADMINS),
        row(
            M::PATCH,
            "/v1/admin/tenants/{tenant}",
            Some(json!({"name": "renamed"})),
            [401, 403, 403, 403, 403, 403, 200],
        ),
        // The cache's figures cover every tenant: the operator's alone.
        row(
            M::GET,
            "/v1/admin/auth-cache",
            None,
            [401, 403, 403, 403, 403, 403, 200],
        ),
        row(
            M::POST,
            "/v1/admin/auth-cache/invalidate",
            Some(json!({"key_id": "{key}"})),
            A_ADMIN_OR_OPERATOR,
        ),
        row(
            M::POST,
            "/v1/admin/auth-cache/invalidate",
            Some(json!({"all": true})),
            [401, 403, 403, 403, 403, 403, 200],
        ),
        row(M::GET, "/v1/admin/audit", None, ADMINS),
        row(
            M::GET,
            "/v1/admin/audit?tenant_id={tenant}",
            None,
            A_ADMIN_OR_OPERATOR,
        )
        .shows("{key}"),
        row(
            M::POST,
            "/v1/admin/rate-limits/reset",
            Some(json!({"key_id": "{key}"})),
            A_ADMIN_ONLY,
        ),
        row(
            M::POST,
            "/v1/admin/rate-limits/reset",
            Some(json!({"key_id": "{key}", "tenant_id": "{tenant}"})),
            A_ADMIN_OR_OPERATOR,
        ),
        // A user id names a user of the caller's own tenant: B's `ua` is
        // not A's, and resetting it touches nothing of A's.
        row(
            M::POST,
            "/v1/admin/rate-limits/reset",
            Some(json!({"user_id": "{user}"})),
            ADMINS,
        ),
        // ---- public
        row(M::GET, "/health", None, PUBLIC),
        row(M::GET, "/ready", None, PUBLIC),
        row(M::GET, "/metrics", None, PUBLIC),
        // ---- destructive, last
        row(M::DELETE, "/v1/admin/keys/{key}", None, A_ADMIN_ONLY),
        row(
            M::DELETE,
            "/v1/admin/keys/{key}?tenant_id={tenant}",
            None,
            A_ADMIN_OR_OPERATOR,
        ),
        row(M::DELETE, "/v1/sessions/{session}", None, A_SESSION).fresh(),
        row(
            M::DELETE,
            "/v1/bots/{bot}",
            None,
            [401, 403, 403, 200, 200, 404, 404],
        )
        .fresh(),
        // Erasure is idempotent: a user a tenant never saw (B's `ua`, the
        // operator's) is erased with nothing to erase, as a missing one is.
        row(
            M::DELETE,
            "/v1/users/{user}",
            None,
            [401, 403, 403, 200, 200, 200, 200],
        )
        .fresh(),
    ]
}

struct World<'a> {
    app: &'a TestApp,
    callers: Vec<Caller>,
    admin_a: Caller,
    user_a: Caller,
    /// The target key of A (the fixture's `{key}`).
    key: String,
    /// Everything of tenant A an outsider must never see.
    secrets: Vec<String>,
    /// Every credential: no answer may show one.
    keys: Vec<String>,
}

impl World<'_> {
    /// A bot of A, a session of A's user with the bot, and a reply in it.
    async fn fixture(&mut self, n: usize) -> Fixture {
        let bot = call(
            self.app,
            &self.admin_a,
            Method::POST,
            "/v1/bots",
            Some(&json!({"name": format!("A's bot {n}"), "model": "gpt-4o-mini"})),
        )
        .await;
        assert_eq!(bot.status, 201, "{}", bot.text);
        let bot = bot.json()["id"].as_str().unwrap().to_owned();
        let session = call(
            self.app,
            &self.user_a,
            Method::POST,
            "/v1/sessions",
            Some(&json!({"bot_id": bot})),
        )
        .await;
        assert_eq!(session.status, 201, "{}", session.text);
        let session = session.json()["id"].as_str().unwrap().to_owned();
        let reply = call(
            self.app,
            &self.user_a,
            Method::POST,
            &format!("/v1/sessions/{session}/messages"),
            Some(&json!({"content": NOTE})),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let reply = reply.json();
        let fx = Fixture {
            bot,
            session,
            message: reply["id"].as_str().unwrap().to_owned(),
            trace: reply["trace_id"].as_str().unwrap().to_owned(),
            user: USER_A.into(),
            key: self.key.clone(),
            tenant: TENANT_A.into(),
        };
        self.secrets.extend([
            fx.bot.clone(),
            fx.session.clone(),
            fx.message.clone(),
            fx.trace.clone(),
        ]);
        fx
    }

    /// Waits until the fixture's trace is stored to its last event (events
    /// go through a batched writer).
    async fn finished(&self, fx: &Fixture) {
        let path = format!("/v1/traces/{}", fx.trace);
        for _ in 0..250 {
            let a = call(self.app, &self.user_a, Method::GET, &path, None).await;
            if a.status == 200 {
                let last = a.json()["data"].as_array().unwrap().last().unwrap()["kind"].clone();
                if last == "request.done" {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the trace {} never finished", fx.trace);
    }

    /// What A's admin sees of the fixture: an outsider's request must not
    /// change any of it.
    async fn snapshot(&self, fx: &Fixture) -> Vec<(u16, Value)> {
        let mut out = Vec::new();
        for path in [
            format!("/v1/bots/{}", fx.bot),
            format!("/v1/sessions/{}", fx.session),
            format!("/v1/sessions/{}/messages?limit=100", fx.session),
        ] {
            let a = call(self.app, &self.admin_a, Method::GET, &path, None).await;
            out.push((a.status, a.json()));
        }
        let keys = call(self.app, &self.admin_a, Method::GET, "/v1/admin/keys", None).await;
        let key = keys.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == fx.key.as_str())
            .cloned()
            .unwrap();
        out.push((keys.status, key));
        out
    }
}

async fn create(app: &TestApp, body: Value) -> Value {
    let operator = Caller {
        key: Some(OPERATOR.into()),
        acting_for: None,
    };
    let a = call(app, &operator, Method::POST, "/v1/admin/keys", Some(&body)).await;
    assert_eq!(a.status, 201, "{}", a.text);
    a.json()
}

impl<'a> World<'a> {
    /// Tenants A and B, and a key for every column of the matrix.
    async fn new(app: &'a TestApp) -> Self {
        let operator = Caller {
            key: Some(OPERATOR.into()),
            acting_for: None,
        };
        for t in [TENANT_A, "tenant-b"] {
            let body = json!({"id": t});
            let a = call(
                app,
                &operator,
                Method::POST,
                "/v1/admin/tenants",
                Some(&body),
            )
            .await;
            assert_eq!(a.status, 201, "{}", a.text);
        }
        let key = |tenant: &str, role: &str, user: Option<&str>| json!({"name": format!("{role}@{tenant}"), "role": role, "tenant_id": tenant, "user_id": user});
        let user_a = create(app, key(TENANT_A, "user", Some(USER_A))).await;
        let user_b = create(app, key("tenant-b", "user", Some("ub"))).await;
        let svc_a = create(app, key(TENANT_A, "service", None)).await;
        let admin_a = create(app, key(TENANT_A, "admin", None)).await;
        let admin_b = create(app, key("tenant-b", "admin", None)).await;
        let target = create(app, key(TENANT_A, "user", Some(USER_A))).await;
        let secret = |k: &Value| k["key"].as_str().unwrap().to_owned();
        let caller = |k: &Value| Caller {
            key: Some(secret(k)),
            acting_for: None,
        };
        let mut secrets = vec![NOTE.to_owned(), TENANT_A.into(), format!("\"{USER_A}\"")];
        for k in [&user_a, &svc_a, &admin_a, &target] {
            secrets.push(k["id"].as_str().unwrap().to_owned());
        }
        Self {
            app,
            callers: vec![
                Caller {
                    key: None,
                    acting_for: None,
                },
                caller(&user_a),
                caller(&user_b),
                // A service key acts for a user of its tenant, named in the header.
                Caller {
                    acting_for: Some(USER_A),
                    ..caller(&svc_a)
                },
                caller(&admin_a),
                caller(&admin_b),
                operator,
            ],
            admin_a: caller(&admin_a),
            user_a: caller(&user_a),
            key: target["id"].as_str().unwrap().to_owned(),
            secrets,
            keys: [&user_a, &user_b, &svc_a, &admin_a, &admin_b, &target]
                .iter()
                .map(|k| secret(k))
                .chain([OPERATOR.to_owned()])
                .collect(),
        }
    }

    /// One cell: `WHO[col]` sends `row` against `fx`. Returns how many calls
    /// an outsider's request made to the provider.
    async fn check(&self, row: &Row, col: usize, fx: &Fixture, ghost: &Fixture) -> u64 {
        let who = WHO[col];
        let cell = format!("{who}: {} {}", row.method, row.path);
        let outside = outsider(who);
        let before = if outside && row.targets_a() {
            Some(self.snapshot(fx).await)
        } else {
            None
        };
        let calls = self.app.mock().calls();
        let (path, body) = row.request(fx);
        let caller = &self.callers[col];
        let answer = call(self.app, caller, row.method.clone(), &path, body.as_ref()).await;
        let calls = self.app.mock().calls() - calls;

        assert_eq!(answer.status, row.want[col], "{cell}: {}", answer.text);
        if answer.status >= 400 {
            assert_error_shape(&path, &answer, &cell);
        }
        for k in &self.keys {
            assert!(!answer.text.contains(k.as_str()), "{cell} shows a key");
        }
        if outside {
            // An answer may echo what the caller sent (an id in its path);
            // that it says nothing more about it, the comparison with a
            // missing resource below shows.
            let sent = format!(
                "{path} {}",
                body.as_ref().map(Value::to_string).unwrap_or_default()
            );
            for s in self
                .secrets
                .iter()
                .filter(|s| !sent.contains(s.trim_matches('"')))
            {
                assert!(
                    !answer.text.contains(s.as_str()),
                    "{cell} shows tenant A's {s}: {}",
                    answer.text
                );
            }
        } else if let (Some(what), 200..=299, true) = (row.shows, answer.status, row.insider(who)) {
            let what = fx.fill(what);
            assert!(
                answer.text.contains(&what),
                "{cell} misses {what}: {}",
                answer.text
            );
        }
        if let Some(before) = before {
            assert_eq!(
                self.snapshot(fx).await,
                before,
                "{cell} changed tenant A's resources"
            );
            // Told exactly what it would be told of nothing at all.
            let (path, body) = row.request(ghost);
            let nothing = call(self.app, caller, row.method.clone(), &path, body.as_ref()).await;
            assert_eq!(
                (nothing.status, ghost.rewrite_as(fx, &nothing.text)),
                (answer.status, answer.text),
                "{cell}: A's resource answers unlike a missing one"
            );
        }
        if outside {
            calls
        } else {
            0
        }
    }
}

/// A refusal's body is its API family's error object, with a message: an
/// OpenAI-shaped `{"error":{message,type,param,code}}`, Anthropic's
/// `{"type":"error","error":{type,message}}`, or the native
/// `{"error":{code,message,details}}`.
fn assert_error_shape(path: &str, answer: &Answer, cell: &str) {
    let v = answer.json();
    let message = |e: &Value| e["message"].as_str().is_some_and(|m| !m.is_empty());
    let native = [
        "/v1/admin/",
        "/v1/sessions",
        "/v1/bots",
        "/v1/traces",
        "/v1/users/",
        "/functions/",
    ]
    .iter()
    .any(|p| path.starts_with(p));
    let ok = if path.starts_with("/v1/messages") {
        v["type"] == "error" && v["error"]["type"].is_string() && message(&v["error"])
    } else if native {
        v["error"]["code"].is_string() && v["error"]["details"].is_object() && message(&v["error"])
    } else {
        let e = &v["error"];
        e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some() && message(e)
    };
    assert!(ok, "{cell}: not its family's error body: {}", answer.text);
}

#[tokio::test]
async fn authorization_matrix_over_every_route() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", OPERATOR)
        .config(CONFIG)
        .spawn()
        .await;
    let mut world = World::new(&app).await;
    let shared = world.fixture(0).await;
    world.finished(&shared).await;
    let ghost = Fixture::ghost();

    let mut outsider_calls = 0;
    let mut n = 0;
    for row in rows() {
        for col in 0..WHO.len() {
            n += 1;
            let fx = if row.fresh {
                world.fixture(n).await
            } else {
                shared.clone()
            };
            outsider_calls += world.check(&row, col, &fx, &ghost).await;
        }
    }

    // What outsiders' requests made reach the provider was their own (chat
    // and embeddings in their tenant), never a reply in A's session.
    assert_eq!(
        outsider_calls, 8,
        "user B's and admin B's own model calls, and no more"
    );
}

/// The route table in crates/server/src/lib.rs, as (METHOD, path) pairs:
/// what the matrix must cover.
fn router_routes() -> Vec<(String, String)> {
    let source = include_str!("../../../server/src/lib.rs");
    let body = source
        .split("pub fn router(")
        .nth(1)
        .unwrap()
        .split("\nfn cors_layer")
        .next()
        .unwrap();
    let mut out = Vec::new();
    for chunk in body.split(".route(").skip(1) {
        let chunk = chunk.trim_start();
        let Some(rest) = chunk.strip_prefix('"') else {
            continue; // the retired paths, from the configuration
        };
        let (path, handlers) = rest.split_once('"').unwrap();
        // The handlers end where the next builder call starts.
        let handlers = handlers
            .split(".fallback(")
            .next()
            .unwrap()
            .split(".layer(")
            .next()
            .unwrap();
        // `get(` but not `s::get_bot)` or `forget(`.
        let starts_a_call = |i: usize| {
            i == 0
                || !(handlers.as_bytes()[i - 1].is_ascii_alphanumeric()
                    || handlers.as_bytes()[i - 1] == b'_')
        };
        for method in ["get", "post", "patch", "put", "delete"] {
            let called = handlers
                .match_indices(&format!("{method}("))
                .any(|(i, _)| starts_a_call(i));
            if called {
                out.push((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    out
}

/// Whether a matrix path (query and all) is served by the router's `route`.
fn serves(route: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap();
    let (mut r, mut p) = (route.split('/'), path.split('/'));
    loop {
        match (r.next(), p.next()) {
            (None, None) => return true,
            (Some(seg), Some(_)) if seg.starts_with("{*") => return true,
            (Some(seg), Some(_)) if seg.starts_with('{') => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

#[test]
fn the_matrix_covers_every_route_the_router_serves() {
    let routes = router_routes();
    assert!(
        routes.len() >= 38,
        "the route table was not read: {routes:?}"
    );
    let rows = rows();
    for (method, route) in &routes {
        assert!(
            rows.iter()
                .any(|r| r.method.as_str() == method && serves(route, r.path)),
            "{method} {route} is missing from the authorization matrix"
        );
    }
    for r in &rows {
        let retired = r.path.starts_with("/functions/v1/chatting")
            || r.path.starts_with("/functions/v1/old-chat");
        assert!(
            retired
                || routes
                    .iter()
                    .any(|(m, route)| r.method.as_str() == m && serves(route, r.path)),
            "{} {} is not a route",
            r.method,
            r.path
        );
    }
}
