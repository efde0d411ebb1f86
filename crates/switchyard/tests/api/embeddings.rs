//! Embeddings: both input shapes, both encodings, DeepInfra's float quirk.

use base64::Engine as _;
use serde_json::{json, Value};
use switchyard_testkit::mock::mock_embedding;

use crate::helpers::*;

fn decode(b64: &str) -> Vec<f32> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    raw.chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[tokio::test]
async fn embeddings_accept_a_string_or_an_array() {
    let app = spawn().await;

    let one: Value = app
        .post_json(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let many: Value = app
        .post_json(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": ["a", "b", "c"]}),
        )
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    let v: Vec<f32> = serde_json::from_value(one["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v, mock_embedding("hello", 8));
    assert_eq!(many["data"].as_array().unwrap().len(), 3);
    assert_eq!(many["data"][2]["index"], 2);
    assert_eq!(
        app.mock().last_request().unwrap().body["model"],
        "embed-upstream"
    );
}

#[tokio::test]
async fn base64_encoding_is_relayed_as_requested() {
    let app = spawn().await;

    let resp: Value = app
        .post_json("/v1/embeddings", &json!({"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64"}))
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(
        decode(resp["data"][0]["embedding"].as_str().unwrap()),
        mock_embedding("hello", 8)
    );
    assert_eq!(
        app.mock().last_request().unwrap().body["encoding_format"],
        "base64"
    );
}

/// DeepInfra is recognised by its base URL; the request goes through an
/// HTTP proxy (the mock) because no real DeepInfra host is reachable here.
#[tokio::test]
async fn deepinfra_gets_float_encoding_and_base64_is_produced_by_the_gateway() {
    let mock = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .env("HTTP_PROXY", &format!("http://{}", mock.addr()))
        .config(
            "[providers.deepinfra]\nkind = \"openai\"\nbase_url = \"http://api.deepinfra.com/v1/openai\"\napi_key = \"di-key\"\n\n\
             [models.bge]\nprovider = \"deepinfra\"\nmodel = \"BAAI/bge-large-en-v1.5\"\n",
        )
        .spawn()
        .await;

    let plain: Value = app
        .post_json("/v1/embeddings", &json!({"model": "bge", "input": "x"}))
        .await
        .json()
        .await
        .unwrap();
    let sent = mock.last_request().unwrap();
    let b64: Value = app
        .post_json(
            "/v1/embeddings",
            &json!({"model": "bge", "input": "x", "encoding_format": "base64"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let sent_b64 = mock.last_request().unwrap();

    assert_eq!(sent.path, "/v1/openai/embeddings");
    assert_eq!(sent.body["encoding_format"], "float");
    assert_eq!(sent_b64.body["encoding_format"], "float");
    let floats: Vec<f32> = serde_json::from_value(plain["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(
        decode(b64["data"][0]["embedding"].as_str().unwrap()),
        floats
    );
}
