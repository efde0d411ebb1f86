//! Reading request bodies under the configured size limit, so that a body
//! too large answers 413 in OpenAI's shape before it is buffered whole.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;

use crate::ApiError;

/// The body, whole, if it is at most `limit` bytes and no pause in it is
/// longer than `timeout` (`server.read_timeout_secs`: 408 past it, so that
/// a client that stops sending cannot hold a request open forever, while a
/// slow one that keeps sending is read to the end).
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
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
    // The usual body is one piece, returned without a copy.
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    "request_timeout",
                    format!(
                        "The request body stopped arriving for {} s.",
                        timeout.as_secs()
                    ),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "body_read_error",
                    "The request body could not be read.",
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let read = first.as_ref().map_or(0, Bytes::len) + more.len();
        if read + data.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        match &first {
            None if more.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    more.extend_from_slice(&f);
                }
                more.extend_from_slice(&data);
            }
        }
    }
    Ok(match first {
        Some(only) => only,
        None => more.freeze(),
    })
}

impl crate::AppState {
    /// [`read_body`] under this server's `max_body_bytes` and read timeout.
    pub(crate) async fn read_body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Bytes, ApiError> {
        read_body(
            headers,
            body,
            self.inner.max_body_bytes,
            self.inner.read_timeout,
        )
        .await
    }
}
