//! TLS termination (`server.tls`): HTTPS with HTTP/1.1 and HTTP/2, HSTS on
//! every response, plain HTTP refused, stalled handshakes not blocking
//! anyone, and unusable certificates stopping startup with the key's path.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard_testkit::app::TestApp;

use crate::helpers::BIN;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn tls_section(cert: &Path, key: &Path) -> String {
    format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nhandshake_timeout_secs = 2\n",
        cert.display(),
        key.display()
    )
}

async fn tls_app() -> TestApp {
    crate::helpers::app()
        .config(&tls_section(&fixture("cert.pem"), &fixture("key.pem")))
        .spawn()
        .await
}

/// A client that trusts only the test CA.
fn client(http2_only: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(fixture("ca.pem")).unwrap()).unwrap();
    let builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .use_rustls_tls();
    let builder = if http2_only {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

fn https(app: &TestApp, path: &str) -> String {
    format!("https://localhost:{}{path}", app.addr.port())
}

/// `GET path` over HTTP/1.1 and TLS.
async fn get_https(app: &TestApp, path: &str) -> reqwest::Response {
    client(false).get(https(app, path)).send().await.unwrap()
}

#[tokio::test]
async fn chat_over_https_works_on_http1_and_http2_with_hsts() {
    let app = tls_app().await;
    for (http2, version) in [
        (false, reqwest::Version::HTTP_11),
        (true, reqwest::Version::HTTP_2),
    ] {
        let resp = client(http2)
            .post(https(&app, "/v1/chat/completions"))
            .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();

        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), version);
        assert_eq!(
            resp.headers()["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "{v}");
    }
    // Errors carry it too.
    let resp = get_https(&app, "/v1/models/no-such-model").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.headers().contains_key("strict-transport-security"));
}

#[tokio::test]
async fn a_stream_over_https_arrives_whole() {
    let app = tls_app().await;
    let text = client(false)
        .post(https(&app, "/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_no_answer() {
    let app = tls_app().await;

    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/health", app.addr.port()))
        .timeout(Duration::from_secs(10))
        .send()
        .await;

    // The handshake fails (rustls answers an alert) and the connection closes.
    let err = plain.expect_err("plain HTTP must not be served");
    assert!(!err.is_timeout(), "{err}");
    // The server is still serving HTTPS.
    let resp = get_https(&app, "/health").await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_stalled_handshake_holds_up_no_one_and_is_closed() {
    let app = tls_app().await;
    let port = app.addr.port();
    // Opens TCP connections and never says anything.
    let stalled: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();

    let resp = get_https(&app, "/health").await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Past `handshake_timeout_secs` (2 s) the server closes them: a read
    // sees the end of the stream instead of blocking until the test's own
    // bound (30 s).
    let closed = tokio::task::spawn_blocking(move || {
        stalled
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = [0u8; 16];
                // The end of the stream, or a reset: closed. A timeout: not.
                match s.read(&mut buf) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(closed, vec![true, true, true]);
}

#[tokio::test]
async fn without_tls_no_hsts_is_sent() {
    let app = crate::helpers::app().spawn().await;
    let resp = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key("strict-transport-security"));
}

#[test]
fn an_unusable_certificate_or_key_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a pem file\n").unwrap();
    let cert = fixture("cert.pem");
    let key = fixture("key.pem");
    // A valid key that is not the certificate's.
    let other_key = fixture("other-key.pem");
    let cases = [
        (&missing, &key, "server.tls.cert_file"),
        (&not_pem, &key, "server.tls.cert_file"),
        (&cert, &missing, "server.tls.key_file"),
        (&cert, &not_pem, "server.tls.key_file"),
        (&cert, &other_key, "server.tls"),
    ];
    for (cert, key, named) in cases {
        let config = dir.path().join("switchyard.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{}/db.sqlite\"\n{}",
                dir.path().display(),
                tls_section(cert, key)
            ),
        )
        .unwrap();

        // `config check` refuses what `serve` would, with the same exit
        // code as any configuration error.
        for command in [&["config", "check"][..], &["serve"][..]] {
            let out = std::process::Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .args(command)
                .env_remove("SWITCHYARD_CONFIG")
                .output()
                .unwrap();

            assert_eq!(out.status.code(), Some(2), "{command:?} {cert:?} {key:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("configuration error: {named}")),
                "{command:?} {cert:?} {key:?}: {err}"
            );
            assert!(!err.contains("BEGIN PRIVATE KEY"), "{err}");
        }
    }
}

#[test]
fn an_empty_path_or_a_zero_timeout_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    for (section, named) in [
        (
            "[server.tls]\ncert_file = \"\"\nkey_file = \"k.pem\"\n",
            "server.tls.cert_file",
        ),
        (
            "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nhandshake_timeout_secs = 0\n",
            "server.tls.handshake_timeout_secs",
        ),
        ("[server.tls]\ncert_file = \"c.pem\"\n", "server.tls"),
    ] {
        std::fs::write(dir.path().join("switchyard.toml"), section).unwrap();

        let out = std::process::Command::new(BIN)
            .args(["config", "check"])
            .current_dir(dir.path())
            .env_remove("SWITCHYARD_CONFIG")
            .output()
            .unwrap();

        assert_eq!(out.status.code(), Some(2), "{section}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{section}: {err}");
    }
}
