//! The one place errors become HTTP responses, in OpenAI's error shape:
//! `{"error":{"message","type","param","code"}}`. A 5xx never carries
//! internal details; those travel in a response extension to the request
//! log line instead.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use switchyard_core::openai::{ErrorEnvelope, ErrorObject, InvalidRequest};
use switchyard_engine::gateway::{provider_message, status_for, unavailable_message};
use switchyard_engine::EngineError;
use switchyard_engine::ProviderError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorObject,
    /// For the log only.
    pub internal: Option<String>,
    pub retry_after: Option<u64>,
    /// The provider was overloaded (a 503 or Anthropic's 529, or a local
    /// model's full queue): Anthropic's clients are told so with its own
    /// status, 529 `overloaded_error`, as they are when a stream is cut by
    /// the same failure (see [`stream_failure`]). OpenAI clients keep the
    /// gateway's status.
    pub overloaded: bool,
}

/// Internal detail of a failed request, for the request log line.
#[derive(Clone, Debug)]
pub struct ErrorDetail(pub String);

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorObject {
                message: message.into(),
                kind: kind.to_owned(),
                param: None,
                code: Some(code.to_owned()),
            },
            internal: None,
            retry_after: None,
            overloaded: false,
        }
    }

    pub fn invalid(e: InvalidRequest) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ErrorObject {
                message: e.message,
                kind: "invalid_request_error".into(),
                param: e.param,
                code: Some(e.code.to_owned()),
            },
            internal: None,
            retry_after: None,
            overloaded: false,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is larger than this server accepts ({limit} bytes)."),
        )
    }

    fn internal(status: StatusCode, kind: &str, code: &str, message: &str, detail: String) -> Self {
        let mut e = Self::new(status, kind, code, message);
        e.internal = Some(detail);
        e
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownModel(model) => {
                let mut err = Self::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!("The model `{model}` does not exist or you do not have access to it."),
                );
                err.body.param = Some("model".into());
                err
            }
            EngineError::Invalid(e) => Self::invalid(e),
            EngineError::Provider(p) => from_provider(p),
            EngineError::Unavailable { model, retry_after } => {
                let mut err = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_error",
                    "model_unavailable",
                    unavailable_message(&model),
                );
                // When a deployment's cool-down ends: clients (the OpenAI
                // SDKs among them) wait that long instead of guessing.
                err.retry_after = retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64);
                err
            }
            e @ (EngineError::Store(_) | EngineError::Setup(_)) => Self::internal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "The server had an error while processing your request.",
                e.to_string(),
            ),
        }
    }
}

/// A provider's 4xx body as an OpenAI error object, read leniently:
/// OpenAI-compatible servers differ in the details (vLLM sends `code` as a
/// number and, in older versions, the fields at the top level; some send
/// `"error": "message"` or a null `type`). `None` when there is no message
/// to relay.
fn relayed_error(body: &[u8]) -> Option<ErrorObject> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = match v.get("error") {
        Some(serde_json::Value::String(m)) => {
            return Some(ErrorObject {
                message: m.clone(),
                kind: "invalid_request_error".into(),
                param: None,
                code: None,
            })
        }
        Some(e @ serde_json::Value::Object(_)) => e,
        _ => &v,
    };
    let text = |k: &str| obj.get(k).and_then(serde_json::Value::as_str);
    let message = text("message").filter(|m| !m.is_empty())?.to_owned();
    let code = match obj.get("code") {
        Some(serde_json::Value::String(c)) => Some(c.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Some(ErrorObject {
        message,
        kind: text("type")
            .filter(|t| !t.is_empty())
            .unwrap_or("invalid_request_error")
            .to_owned(),
        param: text("param").map(str::to_owned),
        code,
    })
}

fn from_provider(p: ProviderError) -> ApiError {
    let status = StatusCode::from_u16(status_for(&p)).unwrap_or(StatusCode::BAD_GATEWAY);
    let detail = p.to_string();
    match p {
        ProviderError::Status {
            status: upstream,
            body,
            retry_after,
        } if status.is_client_error() => {
            // The provider judged the request itself: relay its words.
            let relayed = relayed_error(&body);
            let mut err = ApiError {
                status,
                body: relayed.unwrap_or_else(|| ErrorObject {
                    message: format!("The provider rejected the request with status {upstream}."),
                    kind: "invalid_request_error".into(),
                    param: None,
                    code: Some("upstream_rejected".into()),
                }),
                internal: Some(detail),
                retry_after: None,
                overloaded: false,
            };
            err.retry_after = retry_after.map(|d| d.as_secs_f64().ceil() as u64);
            err
        }
        ProviderError::Status { .. } | ProviderError::Timeout(_) | ProviderError::Connect(_) => {
            // Anthropic's own overload, or another provider's 503: to
            // OpenAI clients a 502, since a 503 may be anything from
            // maintenance to an outage; to Messages clients overload, as
            // the same 503 inside a stream is, so that Anthropic's SDKs
            // retry it whenever it comes.
            let overloaded = matches!(
                p,
                ProviderError::Status {
                    status: 503 | 529,
                    ..
                }
            );
            let mut err = ApiError::internal(
                status,
                "upstream_error",
                p.code(),
                &provider_message(&p),
                detail,
            );
            err.overloaded = overloaded;
            err
        }
        ProviderError::Overloaded { retry_after } => {
            let mut err = ApiError::internal(
                status,
                "server_error",
                p.code(),
                &provider_message(&p),
                detail,
            );
            err.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
            err.overloaded = true;
            err
        }
        ProviderError::ShuttingDown => ApiError::internal(
            status,
            "server_error",
            p.code(),
            &provider_message(&p),
            detail,
        ),
        ProviderError::Protocol(_) | ProviderError::Broken(_) | ProviderError::Truncated => {
            ApiError::internal(
                status,
                "upstream_error",
                "upstream_protocol_error",
                "The provider's response could not be relayed.",
                detail,
            )
        }
    }
}

impl ApiError {
    /// This error's status, headers (`Retry-After`) and logged detail, with
    /// the body another API family gives it.
    pub fn reshaped(self, body: impl FnOnce(StatusCode, &ErrorObject) -> Response) -> Response {
        let reshaped = body(self.status, &self.body);
        let mut resp = self.into_response();
        *resp.body_mut() = reshaped.into_body();
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorEnvelope { error: self.body }).unwrap_or_default();
        let mut resp = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(detail) = self.internal {
            resp.extensions_mut().insert(ErrorDetail(detail));
        }
        resp
    }
}

/// The JSON of an error frame for a stream that fails after it started.
pub fn stream_error_json(e: &ProviderError) -> Vec<u8> {
    serde_json::to_vec(&ErrorEnvelope {
        error: stream_failure(e).1,
    })
    .unwrap_or_default()
}

/// What a client is told when a stream breaks after its first byte, with
/// the status the failure stands for. An error the provider put in its
/// stream that judges the request (a 4xx, e.g. the context is too long) is
/// relayed like one before the stream (its body is scrubbed of the key);
/// others stay generic.
pub fn stream_failure(e: &ProviderError) -> (u16, ErrorObject) {
    // The statuses of a failure before the stream (`status_for`: a 401 or
    // 403 is the gateway's key, not the client's fault), except that an
    // overloaded provider stays overloaded, as Anthropic's own stream says.
    let status = match e {
        ProviderError::Status {
            status: 503 | 529, ..
        } => 503,
        other => status_for(other),
    };
    if let ProviderError::Status { body, .. } = e {
        if (400..500).contains(&status) {
            if let Some(error) = relayed_error(body) {
                return (status, error);
            }
        }
    }
    if matches!(e, ProviderError::ShuttingDown) {
        return (
            status,
            ErrorObject {
                message: switchyard_engine::gateway::SHUTTING_DOWN.into(),
                kind: "server_error".into(),
                param: None,
                code: Some(e.code().into()),
            },
        );
    }
    // An overloaded provider (Anthropic's `overloaded_error`) is said to be
    // one, so that a client knows that trying again later may succeed.
    let overloaded = matches!(
        e,
        ProviderError::Status {
            status: 503 | 529,
            ..
        } | ProviderError::Overloaded { .. }
    );
    let (message, code) = if overloaded {
        (
            "The provider is overloaded and cut the stream before it was complete; trying again later may succeed."
                .to_owned(),
            "upstream_overloaded",
        )
    } else if matches!(e, ProviderError::Timeout(_)) {
        (
            "The provider stopped answering before the stream was complete.".to_owned(),
            e.code(),
        )
    } else if matches!(e, ProviderError::Status { .. }) {
        // An error the provider sent inside the stream (its details, like
        // any 5xx body's, stay in the log; its status may be one inferred
        // from its type, so it is not stated).
        (
            "The provider reported an error before the stream was complete.".to_owned(),
            e.code(),
        )
    } else {
        (
            "The provider's stream broke before it was complete.".to_owned(),
            e.code(),
        )
    };
    (
        status,
        ErrorObject {
            message,
            kind: "upstream_error".into(),
            param: None,
            code: Some(code.into()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_errors_are_relayed_whatever_their_dialect() {
        let cases = [
            (
                r#"{"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
                (
                    "bad",
                    "invalid_request_error",
                    Some("messages"),
                    Some("context_length_exceeded"),
                ),
            ),
            // vLLM: numeric code, fields at the top level.
            (
                r#"{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}"#,
                ("too long", "BadRequestError", None, Some("400")),
            ),
            (
                r#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter"}}"#,
                (
                    "filtered",
                    "invalid_request_error",
                    Some("prompt"),
                    Some("content_filter"),
                ),
            ),
            (
                r#"{"error":"model is required"}"#,
                ("model is required", "invalid_request_error", None, None),
            ),
        ];
        for (body, (message, kind, param, code)) in cases {
            let e = relayed_error(body.as_bytes()).unwrap();
            assert_eq!(e.message, message, "{body}");
            assert_eq!(e.kind, kind, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}");
            assert_eq!(e.code.as_deref(), code, "{body}");
        }
        for body in [
            "",
            "<html>502</html>",
            r#"{"error":{}}"#,
            r#"{"detail":"x"}"#,
        ] {
            assert!(relayed_error(body.as_bytes()).is_none(), "{body}");
        }
    }

    #[test]
    fn a_streams_error_relays_the_providers_words_only_for_a_4xx() {
        let failed = |status: u16| {
            ProviderError::Status {
            status,
            body: bytes::Bytes::from_static(
                br#"{"error":{"message":"prompt too long","type":"invalid_request_error","param":null,"code":"context_length_exceeded"}}"#,
            ),
            retry_after: None,
        }
        };
        let v: serde_json::Value =
            serde_json::from_slice(&stream_error_json(&failed(400))).unwrap();
        assert_eq!(v["error"]["message"], "prompt too long");
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        let v: serde_json::Value =
            serde_json::from_slice(&stream_error_json(&failed(500))).unwrap();
        assert_eq!(
            v["error"]["message"],
            "The provider reported an error before the stream was complete."
        );
        assert_eq!(v["error"]["type"], "upstream_error");
    }
}
