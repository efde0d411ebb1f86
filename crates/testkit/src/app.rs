//! Starts the real `switchyard` binary as a child process: port 0, a fresh
//! SQLite file (or a fresh PostgreSQL schema), and by default a mock upstream
//! configured as provider `mock`. Being a real process, it can be stopped
//! with SIGTERM or SIGKILL exactly as in production.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mock::MockUpstream;

/// The provider key the mock provider is configured with; tests assert it
/// never appears in a response or a log line.
pub const MOCK_PROVIDER_KEY: &str = "sk-mock-provider-secret-0123456789abcdef";

/// Environment variables that would change the configuration under test.
const SCRUBBED_ENV: &[&str] = &[
    "CHAT_API_BASE",
    "CHAT_API_KEY",
    "OPENAI_API_KEY",
    "CHAT_MODEL_DEFAULT",
    "EMBEDDING_API_BASE",
    "EMBEDDING_API_KEY",
    "EMBEDDING_MODEL_DEFAULT",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_MODEL_DEFAULT",
    "LLM_PROVIDER",
    "LLM_FALLBACK_PROVIDER",
    "SWITCHYARD_ADMIN_KEY",
    "SWITCHYARD_CONFIG",
    "RUST_LOG",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

pub struct AppBuilder {
    binary: Option<PathBuf>,
    extra_toml: String,
    env: Vec<(String, String)>,
    with_mock: bool,
    postgres: Option<String>,
    store_url: Option<String>,
}

impl Default for AppBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl AppBuilder {
    pub fn new() -> Self {
        Self {
            binary: None,
            extra_toml: String::new(),
            env: Vec::new(),
            with_mock: true,
            postgres: None,
            store_url: None,
        }
    }

    /// The binary to run (default: `$SWITCHYARD_BIN`, else `switchyard` next
    /// to the test executable's directory).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// TOML appended to the generated configuration file.
    pub fn config(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Do not start a mock upstream or configure the `mock` provider.
    pub fn without_mock(mut self) -> Self {
        self.with_mock = false;
        self
    }

    /// Use this PostgreSQL database, in a fresh schema.
    pub fn postgres(mut self, url: &str) -> Self {
        self.postgres = Some(url.to_owned());
        self
    }

    /// Use this store URL as it is (e.g. another app's SQLite file, to
    /// restart on its data); wins over [`AppBuilder::postgres`].
    pub fn store_url(mut self, url: &str) -> Self {
        self.store_url = Some(url.to_owned());
        self
    }

    pub async fn spawn(self) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mock = if self.with_mock {
            Some(MockUpstream::start().await.expect("mock upstream"))
        } else {
            None
        };
        let schema = self
            .postgres
            .as_ref()
            .filter(|_| self.store_url.is_none())
            .map(|_| format!("t_{:016x}", rand_u64()));
        let store_url = match (&self.store_url, &self.postgres) {
            (Some(url), _) | (None, Some(url)) => url.clone(),
            (None, None) => format!("sqlite://{}/switchyard.db", dir.path().display()),
        };
        let store = match &schema {
            Some(schema) => format!("[store]\nurl = \"{store_url}\"\nschema = \"{schema}\"\n"),
            None => format!("[store]\nurl = \"{store_url}\"\n"),
        };
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n\n{store}\n[usage]\nflush_interval_ms = 20\n\n[log]\nlevel = \"info\"\nformat = \"json\"\n\n"
        );
        if let Some(m) = &mock {
            toml.push_str(&format!(
                "[providers.mock]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"{MOCK_PROVIDER_KEY}\"\ntimeout_secs = 5\n\n\
                 [models.gpt-4o-mini]\nprovider = \"mock\"\nmodel = \"gpt-4o-mini-upstream\"\n\n\
                 [models.text-embedding-3-small]\nprovider = \"mock\"\nmodel = \"embed-upstream\"\n\n\
                 [pricing.gpt-4o-mini-upstream]\ninput_per_mtok = 0.15\noutput_per_mtok = 0.60\n\n",
                m.base_url()
            ));
        }
        toml.push_str(&self.extra_toml);
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, &toml).expect("writing config");

        let binary = self.binary.unwrap_or_else(default_binary);
        let mut cmd = Command::new(&binary);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("serve")
            .current_dir(dir.path());
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHYARD_") && k.contains("__") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));

        let logs = Arc::new(Mutex::new(Vec::<String>::new()));
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let stdout = child.stdout.take().expect("stdout");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Kept before the address is reported, so that once spawn()
                // returns, logs() holds every line up to `listening`.
                let addr = listening_addr(&line);
                sink.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });

        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join");
        let addr = match addr {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "switchyard did not start; output:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        TestApp {
            addr,
            child: Some(child),
            logs,
            mock,
            dir,
            config_path,
            client: reqwest::Client::new(),
            store_url,
            store_schema: schema,
        }
    }
}

/// Starts the server with the mock upstream and the default test configuration.
pub async fn spawn_app() -> TestApp {
    AppBuilder::new().spawn().await
}

fn default_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHYARD_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/switchyard
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    profile_dir.join("switchyard")
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("message")?.as_str()? != "listening" {
        return None;
    }
    v.get("addr")?.as_str()?.parse().ok()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// A running server; killed when dropped.
pub struct TestApp {
    pub addr: SocketAddr,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    pub mock: Option<MockUpstream>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub client: reqwest::Client,
    /// The store the server uses, and its PostgreSQL schema if any.
    pub store_url: String,
    pub store_schema: Option<String>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn mock(&self) -> &MockUpstream {
        self.mock.as_ref().expect("this app has no mock upstream")
    }

    /// Every line the server printed so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The first log line matching `pred`, waiting up to 5 s for it: the
    /// server writes its log in batches, a few milliseconds after the fact.
    pub async fn wait_for_log(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// POSTs a JSON value.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn stop_gracefully(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit().await
    }

    /// Sends SIGINT (what ctrl-c in a terminal sends) and waits for the
    /// process to exit.
    pub async fn interrupt(&mut self) -> ExitStatus {
        self.signal("INT");
        self.wait_exit().await
    }

    /// SIGKILL: no cleanup at all.
    pub async fn kill_hard(&mut self) -> ExitStatus {
        self.signal("KILL");
        self.wait_exit().await
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit (after a signal sent elsewhere).
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let status = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(s) = child.try_wait().expect("wait") {
                    return s;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    return child.wait().expect("wait");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .expect("join");
        // Let the reader threads take the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        status
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
