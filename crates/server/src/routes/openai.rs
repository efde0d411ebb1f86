//! The OpenAI-compatible endpoints: chat completions (streamed or not),
//! embeddings and the model list.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde_json::json;
use switchyard_core::identity::Principal;
use switchyard_core::openai::{ChatRequest, EmbeddingsRequest, InvalidRequest};
use switchyard_core::sessions::{StoredResponse, SSE_HEADERS};
use switchyard_core::trace::TraceContext;
use switchyard_engine::idempotency::Claimed;
use switchyard_engine::{ChatOutcome, ModelInfo, RequestMeta, StreamEvent};

use crate::error::{stream_error_json, ApiError};
use crate::observe::{ModelLabel, ProviderLabel};
use crate::AppState;

pub(crate) fn meta(
    state: &AppState,
    ctx: &TraceContext,
    started: Instant,
    who: &Principal,
) -> RequestMeta {
    RequestMeta {
        tokens: crate::limit::token_meter(state, who),
        trace_id: ctx.trace_id(),
        tenant_id: who.tenant_id.clone(),
        key_id: who.key_id.clone(),
        user_id: who.user_id.clone(),
        started,
        session_id: None,
    }
}

/// Labels the response with the alias only when it is configured, so a
/// client cannot grow the metrics with made-up model names.
pub(crate) fn label(state: &AppState, resp: &mut Response, model: &str, provider: Option<&str>) {
    if state.gateway().models().iter().any(|m| m.id == model) {
        resp.extensions_mut().insert(ModelLabel(model.to_owned()));
    }
    if let Some(p) = provider {
        resp.extensions_mut().insert(ProviderLabel(p.to_owned()));
        if let Ok(v) = HeaderValue::from_str(p) {
            resp.headers_mut().insert("x-switchyard-provider", v);
        }
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(started): Extension<Instant>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let bytes = match state.read_body(&headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let req = match ChatRequest::parse(&bytes) {
        Ok(r) => r,
        Err(e) => return ApiError::invalid(e).into_response(),
    };
    let claim = match crate::routes::sessions::claim_key(
        &state,
        &principal,
        crate::routes::sessions::header_key(&headers),
        "/v1/chat/completions",
        &bytes,
        false,
    )
    .await
    {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let outcome = state
        .gateway()
        .chat(&meta(&state, &ctx, started, &principal), &req)
        .await;
    let (mut resp, provider) = match outcome {
        Ok(ChatOutcome::Complete { body, provider, .. }) => {
            if let Some(claim) = claim {
                claim
                    .complete(&StoredResponse {
                        status: 200,
                        headers: vec![
                            ("content-type".to_owned(), "application/json".to_owned()),
                            ("x-switchyard-provider".to_owned(), provider.to_string()),
                        ],
                        body: body.to_vec(),
                    })
                    .await;
            }
            (json_response(body), Some(provider))
        }
        Ok(ChatOutcome::Stream {
            events, provider, ..
        }) => {
            let resp = match claim {
                None => sse_response(events),
                Some(claim) => sse_response_stored(events, claim, &provider),
            };
            (resp, Some(provider))
        }
        Err(e) => {
            // Not kept: free the key before the client sees the failure.
            if let Some(claim) = claim {
                claim.release().await;
            }
            (ApiError::from(e).into_response(), None)
        }
    };
    label(&state, &mut resp, &req.model, provider.as_deref());
    resp
}

pub async fn embeddings(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(started): Extension<Instant>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let req = match read_request(&state, &headers, body, EmbeddingsRequest::parse).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (mut resp, provider) = match state
        .gateway()
        .embeddings(&meta(&state, &ctx, started, &principal), &req)
        .await
    {
        Ok((body, provider)) => (json_response(body), Some(provider)),
        Err(e) => (ApiError::from(e).into_response(), None),
    };
    label(&state, &mut resp, &req.model, provider.as_deref());
    resp
}

/// Reads the body under the size limit and validates it; a failure is the
/// finished error response (413, or 400 naming the field).
async fn read_request<T>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    parse: fn(&[u8]) -> Result<T, InvalidRequest>,
) -> Result<T, Response> {
    let bytes = state
        .read_body(headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    parse(&bytes).map_err(|e| ApiError::invalid(e).into_response())
}

pub(crate) fn json_response(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Relays chunks as they arrive; the stream always ends with `[DONE]` or,
/// if the provider failed midway, an `error` object — never silently.
fn sse_response(events: Box<dyn futures::Stream<Item = StreamEvent> + Send + Unpin>) -> Response {
    let frames = events.map(|ev| Ok::<_, Infallible>(event_frame(&ev)));
    sse(Body::from_stream(frames))
}

fn event_frame(ev: &StreamEvent) -> Bytes {
    match ev {
        StreamEvent::Chunk(json) => frame(json),
        StreamEvent::Done => Bytes::from_static(b"data: [DONE]\n\n"),
        StreamEvent::Error(e) => frame(&stream_error_json(e)),
    }
}

/// [`sse_response`] that also keeps the stream for idempotent replays: a
/// complete stream is stored before its `[DONE]` is sent (so a client that
/// saw the end finds it stored); a failed one releases the key before its
/// error is sent, an abandoned one when it is dropped.
fn sse_response_stored(
    events: Box<dyn futures::Stream<Item = StreamEvent> + Send + Unpin>,
    claim: Claimed,
    provider: &str,
) -> Response {
    let provider = provider.to_owned();
    let frames = futures::stream::unfold(
        (events, Some(claim), Vec::new(), provider),
        |(mut events, mut claim, mut kept, provider)| async move {
            let ev = events.next().await?;
            let frame = event_frame(&ev);
            match ev {
                StreamEvent::Chunk(_) => kept.extend_from_slice(&frame),
                StreamEvent::Done => {
                    kept.extend_from_slice(&frame);
                    if let Some(c) = claim.take() {
                        let body = std::mem::take(&mut kept);
                        c.complete(&StoredResponse::sse(body, Some(&provider)))
                            .await;
                    }
                }
                StreamEvent::Error(_) => {
                    if let Some(c) = claim.take() {
                        c.release().await;
                    }
                }
            }
            Some((Ok::<_, Infallible>(frame), (events, claim, kept, provider)))
        },
    );
    sse(Body::from_stream(frames))
}

/// An event stream body that lets the first event of every burst go out on
/// its own. hyper writes body frames that are ready together, when the body
/// has nothing more; so when events arrive faster than they are relayed (an
/// upstream answer read in one piece, a provider that sends in bursts), the
/// first token of a burst would wait for the burst's last. After that first
/// frame the body answers "not ready" once (and wakes itself), which makes
/// hyper write it; the rest of the burst is then written together.
struct FirstOfBurst {
    inner: Body,
    /// The last poll found nothing ready (or nothing has been polled yet).
    after_idle: bool,
    /// The next poll answers `Pending` so that what is buffered is written.
    yielding: bool,
}

impl http_body::Body for FirstOfBurst {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.yielding {
            this.yielding = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if std::mem::take(&mut this.after_idle) {
                    this.yielding = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                this.after_idle = true;
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.yielding && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A `text/event-stream` response, unbuffered by proxies in between.
pub(crate) fn sse(body: Body) -> Response {
    let mut resp = Response::new(Body::new(FirstOfBurst {
        inner: body,
        after_idle: true,
        yielding: false,
    }));
    for (name, value) in SSE_HEADERS {
        resp.headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    resp
}

/// One SSE event carrying `json`: a `data:` line per line of it (a provider
/// may spread its JSON over several `data:` lines, which its parser joined
/// with newlines; one `data:` prefix would leave the later lines bare).
fn frame(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    if !json.contains(&b'\n') {
        b.put_slice(b"data: ");
        b.put_slice(json);
        b.put_slice(b"\n\n");
        return b.freeze();
    }
    for line in json.split(|&c| c == b'\n') {
        b.put_slice(b"data: ");
        b.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
        b.put_slice(b"\n");
    }
    b.put_slice(b"\n");
    b.freeze()
}

fn model_json(m: &ModelInfo) -> serde_json::Value {
    json!({"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by})
}

pub async fn list_models(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if super::anthropic::is_anthropic_client(&headers) {
        return super::anthropic::list_models(&state, &uri);
    }
    let data: Vec<_> = state.gateway().models().iter().map(model_json).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn get_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    if super::anthropic::is_anthropic_client(&headers) {
        return super::anthropic::get_model(&state, &model);
    }
    match state.gateway().models().iter().find(|m| m.id == model) {
        Some(m) => axum::Json(model_json(m)).into_response(),
        None => {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            );
            e.body.param = Some("model".into());
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    use http_body::Body as _;

    use super::*;

    #[test]
    fn a_frame_gives_every_line_of_its_data_a_prefix() {
        assert_eq!(&frame(br#"{"a":1}"#)[..], b"data: {\"a\":1}\n\n");
        assert_eq!(
            &frame(b"{\n\"a\": 1\r\n}")[..],
            b"data: {\ndata: \"a\": 1\ndata: }\n\n"
        );
    }

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What polling gives, as text: a frame's bytes, `-` for Pending, `.` at the end.
    fn poll(body: &mut FirstOfBurst, cx: &mut Context<'_>) -> String {
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => String::from_utf8(f.into_data().unwrap().to_vec()).unwrap(),
            Poll::Ready(None) => ".".into(),
            Poll::Ready(Some(Err(e))) => panic!("{e}"),
            Poll::Pending => "-".into(),
        }
    }

    #[test]
    fn the_first_frame_of_each_burst_is_followed_by_one_self_waking_pending() {
        // a, b, c are ready together; then the source has nothing (Pending)
        // until d and e, ready together.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, Infallible>>();
        for x in ["a", "b", "c"] {
            tx.unbounded_send(Ok(Bytes::from(x))).unwrap();
        }
        let mut body = FirstOfBurst {
            inner: Body::from_stream(rx),
            after_idle: true,
            yielding: false,
        };
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(poll(&mut body, &mut cx));
        }
        assert_eq!(seen, ["a", "-", "b", "c", "-"]);
        // Only the yield woke the task: the real Pending waits for the source.
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        for x in ["d", "e"] {
            tx.unbounded_send(Ok(Bytes::from(x))).unwrap();
        }
        drop(tx);
        let seen: Vec<_> = (0..4).map(|_| poll(&mut body, &mut cx)).collect();
        assert_eq!(seen, ["d", "-", "e", "."]);
    }
}
