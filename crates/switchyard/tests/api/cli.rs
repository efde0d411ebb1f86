//! The command line: `config check`, configuration errors, `migrate`.

use std::process::Command;

use crate::helpers::BIN;

fn run(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir);
    for k in [
        "CHAT_API_BASE",
        "CHAT_API_KEY",
        "OPENAI_API_KEY",
        "SWITCHYARD_CONFIG",
        "EMBEDDING_API_KEY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn config_check_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("switchyard.toml"),
        "[store]\nurl = \"postgres://app:pg-password@db:5432/x\"\n[providers.p]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\napi_key = \"sk-file-key\"\n",
    )
    .unwrap();

    let out = run(
        &["config", "check"],
        &[
            ("CHAT_API_KEY", "sk-env-key"),
            ("SWITCHYARD_SERVER__LISTEN", "127.0.0.1:9999"),
        ],
        dir.path(),
    );

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("[providers.chat]"), "{text}");
    for secret in ["sk-file-key", "sk-env-key", "pg-password"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    assert!(text.contains("[redacted]"));
}

#[test]
fn a_variable_that_is_not_utf8_does_not_stop_startup() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .current_dir(dir.path())
        .env("SOME_OTHER_TOOL", std::ffi::OsStr::from_bytes(b"caf\xe9"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bad_key_stops_startup_naming_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[server]\nlisten = 8080\n").unwrap();

    let out = run(&["--config", "bad.toml", "serve"], &[], dir.path());

    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("server.listen: invalid type: integer `8080`, expected"),
        "{err}"
    );

    let out = run(&["serve"], &[("SWITCHYARD_SERVER__TYPO", "1")], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.typo: unknown field `typo`"));
}

#[test]
fn migrate_creates_the_database_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SWITCHYARD_STORE__URL", "sqlite://data/sy.db")];

    let first = run(&["migrate"], &env, dir.path());
    let second = run(&["migrate"], &env, dir.path());

    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout)
        .contains("applied versions: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"));
    assert!(dir.path().join("data/sy.db").exists());
}

#[test]
fn the_example_configuration_is_valid_and_its_secrets_are_masked() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../switchyard.example.toml");
    // Its local aliases need the model files where `models_dir` says: only
    // their presence is checked.
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("all-MiniLM-L6-v2")).unwrap();
    std::fs::write(models.join("SmolLM2-135M-Instruct.Q4_1.gguf"), "").unwrap();
    std::fs::write(models.join("all-MiniLM-L6-v2/model.safetensors"), "").unwrap();

    let out = run(&["--config", example, "config", "check"], &[], dir.path());

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[models.llama-3-8b]"), "{text}");
    assert!(!text.contains("sk-..."), "{text}");
}

/// Environment variables set for one run.
type Env = &'static [(&'static str, &'static str)];

#[test]
fn config_check_refuses_what_serve_would_refuse_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Env, &str); 7] = [
        (
            "[auth]\nuser_header = \"bad header\"\n",
            &[],
            "auth.user_header",
        ),
        (
            "",
            &[("SWITCHYARD_ADMIN_KEY", "short-admin-key")],
            "auth.admin_key",
        ),
        (
            "[log]\nlevel = \"info,switchyard=loud\"\n",
            &[],
            "log.level",
        ),
        (
            "[server.tls]\ncert_file = \"missing-cert.pem\"\nkey_file = \"missing-key.pem\"\n",
            &[],
            "server.tls.cert_file",
        ),
        (
            "[rate_limits]\nredis_url = \"http://127.0.0.1:1\"\n",
            &[],
            "rate_limits.redis_url",
        ),
        // The proxy the environment names for a provider must be http://.
        (
            "[providers.p]\nkind = \"openai\"\nbase_url = \"https://api.example.com/v1\"\napi_key = \"k\"\n[models.m]\nprovider = \"p\"\nmodel = \"x\"\n",
            &[("HTTPS_PROXY", "https://alice:hunter2@proxy.local:443")],
            "providers.p.base_url",
        ),
        (
            "[providers.here]\nkind = \"local\"\n[models.m]\nprovider = \"here\"\nmodel = \"smollm2-135m-instruct\"\n[local]\nmodels_dir = \"no-models-here\"\n",
            &[],
            "local.models_dir",
        ),
    ];
    for (toml, env, named) in cases {
        std::fs::write(dir.path().join("switchyard.toml"), toml).unwrap();
        for args in [&["config", "check"][..], &["serve"][..]] {
            let out = run(args, env, dir.path());

            assert_eq!(out.status.code(), Some(2), "{args:?} {toml}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("configuration error: {named}:")),
                "{args:?} {toml}: {err}"
            );
            assert!(
                !err.contains("short-admin-key")
                    && !err.contains("hunter2")
                    && !err.contains("not understood"),
                "{err}"
            );
        }
    }
}
