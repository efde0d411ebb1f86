//! Runs the official `openai` Python SDK against the gateway
//! (`tests/python/test_openai_sdk.py`). Needs `SWITCHYARD_PYTHON`, a Python
//! with `openai` and `pytest` (the test command provides one);
//! `SWITCHYARD_REQUIRE_PY=1` makes its absence a failure.

use crate::helpers::*;

#[tokio::test]
async fn the_official_openai_python_sdk_works_unchanged() {
    let python = match std::env::var("SWITCHYARD_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            assert_ne!(
                std::env::var("SWITCHYARD_REQUIRE_PY").as_deref(),
                Ok("1"),
                "SWITCHYARD_PYTHON is required"
            );
            eprintln!("skipping: SWITCHYARD_PYTHON is not set");
            return;
        }
    };
    let app = spawn().await;
    let tests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/test_openai_sdk.py"
    );

    let out = tokio::process::Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", tests])
        .env("OPENAI_BASE_URL", app.url("/v1"))
        .env_remove("OPENAI_API_KEY")
        .output()
        .await
        .unwrap();

    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{report}");
    assert!(report.contains("7 passed"), "{report}");
}
