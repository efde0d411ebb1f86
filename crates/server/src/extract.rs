//! Reading request bodies under the configured size limit, so that a body
//! too large answers 413 in OpenAI's shape before it is buffered whole.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use http_body_util::LengthLimitError;

use crate::ApiError;

/// The body, whole, if it is at most `limit` bytes and arrives within
/// `timeout` (`server.read_timeout_secs`: 408 past it, so that a client
/// sending a byte at a time cannot hold a request open forever).
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let Ok(read) = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs()
            ),
        ));
    };
    read.map_err(|e| {
        let inner = e.into_inner();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
        while let Some(s) = source {
            if s.is::<LengthLimitError>() {
                return ApiError::too_large(limit);
            }
            source = s.source();
        }
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body_read_error",
            "The request body could not be read.",
        )
    })
}
