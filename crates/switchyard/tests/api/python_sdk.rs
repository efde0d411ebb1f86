//! Runs the official `openai` and `anthropic` Python SDKs against the gateway
//! (`tests/python/`), with an Anthropic-backed alias `claude`. Needs `SWITCHYARD_PYTHON`, a Python
//! with `openai` and `pytest` (the test command provides one);
//! `SWITCHYARD_REQUIRE_PY=1` makes its absence a failure.

use crate::helpers::*;

/// The key the SDKs authenticate with (bootstrapped as the admin key).
const SDK_KEY: &str = "sdk-test-admin-key-0123456789abcdef0123";

/// `SWITCHYARD_PYTHON`, or `None` (skip) when it is unset and not required.
fn python() -> Option<String> {
    match std::env::var("SWITCHYARD_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            assert_ne!(
                std::env::var("SWITCHYARD_REQUIRE_PY").as_deref(),
                Ok("1"),
                "SWITCHYARD_PYTHON is required"
            );
            eprintln!("skipping: SWITCHYARD_PYTHON is not set");
            None
        }
    }
}

/// Runs the pytest files of `tests/<dir>` against `app` with the SDK key;
/// returns pytest's report after asserting that it passed.
async fn pytest(python: &str, dir: &str, app: &switchyard_testkit::TestApp) -> String {
    let tests = format!("{}/tests/{dir}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", &tests])
        .env("OPENAI_BASE_URL", app.url("/v1"))
        .env("ANTHROPIC_BASE_URL", app.url(""))
        .env("SWITCHYARD_TEST_KEY", SDK_KEY)
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .await
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{report}");
    report
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_unchanged() {
    let Some(python) = python() else { return };
    let anthropic = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .config(&format!(
            "[providers.anthropic]\nkind = \"anthropic\"\nbase_url = \"{}\"\n\n\
             [models.claude]\nprovider = \"anthropic\"\nmodel = \"claude-mock\"\n\n\
             [rate_limits.classes]\nchat = \"600/min\"\nglobal = \"600/min\"\n",
            anthropic.base_url()
        ))
        .env("SWITCHYARD_ADMIN_KEY", SDK_KEY)
        .spawn()
        .await;
    let report = pytest(&python, "python", &app).await;
    assert!(report.contains("22 passed"), "{report}");
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_against_the_local_models_offline() {
    let Some(python) = python() else { return };
    let Some(models) = crate::local::models_dir() else {
        return;
    };
    // No mock and no provider: only the default local aliases exist.
    let app = app()
        .without_mock()
        .config(&format!("[local]\nmodels_dir = \"{}\"\n", models.display()))
        .env("SWITCHYARD_ADMIN_KEY", SDK_KEY)
        .spawn()
        .await;
    let report = pytest(&python, "python_local", &app).await;
    assert!(report.contains("9 passed"), "{report}");
}
