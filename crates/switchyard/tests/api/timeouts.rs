//! Per-deployment timeouts on the running binary: connect, first byte (and
//! its per-deployment override) and total. Every request is bounded by the
//! test itself well below the time a broken timeout would take, so a broken
//! timeout fails the test rather than hanging it; no test asserts how long
//! anything took.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use switchyard_testkit::MockUpstream;
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::*;

/// A loopback address where `connect()` hangs: a listener that never
/// accepts, with its accept queue filled by held connections, so the kernel
/// drops every further SYN unanswered.
struct Blackhole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _held: Vec<TcpStream>,
}

async fn blackhole() -> Blackhole {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(conn)) => held.push(conn),
            Ok(Err(e)) => panic!("connecting to the listener: {e}"),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: listener,
                    _held: held,
                }
            }
        }
    }
    panic!("the listener's accept queue never filled");
}

#[tokio::test]
async fn a_connect_that_hangs_times_out_per_connect_timeout_and_the_fallback_serves() {
    let hole = blackhole().await;
    let fallback = MockUpstream::start().await.unwrap();
    // The first-byte budget (60 s) is far beyond the test's own bound (20 s):
    // only the connect timeout can end the attempt in time.
    let app = app()
        .without_mock()
        .config(&primary_then_fallback(
            "max_attempts = 1",
            &format!("http://{}/v1", hole.addr),
            "connect_timeout_ms = 300\nfirst_byte_timeout_ms = 60000",
            &fallback.base_url(),
        ))
        .spawn()
        .await;

    let (status, provider, _) =
        send_within(&app, &chat_body("smart"), Duration::from_secs(20)).await;

    assert_eq!((status, provider.as_str()), (200, "fallback"));
    assert_eq!(fallback.calls(), 1);
    let line = wait_for_log_json(&app, |l| l.contains("falling back"))
        .await
        .unwrap();
    assert_eq!(
        line["error"], "could not connect to the provider: tcp connect timed out after 300ms",
        "{line}"
    );
}

#[tokio::test]
async fn a_deployments_first_byte_timeout_overrides_its_providers() {
    // One slow provider (2 s before it answers) with a 200 ms first-byte
    // budget, used by two aliases: `impatient` keeps the provider's budget,
    // `patient` raises it for its deployment to 20 s.
    let slow = MockUpstream::start().await.unwrap();
    slow.update(|b| b.latency = Duration::from_secs(2));
    let fallback = MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .config(&format!(
            "[resilience]\nmax_attempts = 1\n\n\
             [providers.slow]\nkind = \"openai\"\nbase_url = \"{}\"\nfirst_byte_timeout_ms = 200\n\n\
             [providers.fallback]\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [[models.impatient.route]]\nprovider = \"slow\"\nmodel = \"s-model\"\n\n\
             [[models.impatient.route]]\nprovider = \"fallback\"\nmodel = \"f-model\"\n\n\
             [[models.patient.route]]\nprovider = \"slow\"\nmodel = \"s-model\"\nfirst_byte_timeout_ms = 20000\n\n\
             [[models.patient.route]]\nprovider = \"fallback\"\nmodel = \"f-model\"\n",
            slow.base_url(),
            fallback.base_url()
        ))
        .spawn()
        .await;

    let impatient = send_within(&app, &chat_body("impatient"), Duration::from_secs(20)).await;
    let patient = send_within(&app, &chat_body("patient"), Duration::from_secs(20)).await;

    assert_eq!((impatient.0, impatient.1.as_str()), (200, "fallback"));
    assert_eq!(
        (patient.0, patient.1.as_str()),
        (200, "slow"),
        "the override gave the slow provider the time it needed"
    );
    assert_eq!((slow.calls(), fallback.calls()), (2, 1));
}

#[tokio::test]
async fn the_total_timeout_ends_a_stream_that_runs_past_it_with_an_error_event() {
    // The first chunk comes at once, then one every 500 ms: about 4.5 s in
    // all, past the deployment's 1 s total budget.
    let app = app()
        .config(
            "[models.brief]\nroute = [{ provider = \"mock\", model = \"m\", timeout_secs = 1 }]\n",
        )
        .spawn()
        .await;
    app.mock()
        .update(|b| b.chunk_delay = Duration::from_millis(500));

    let (status, _, text) =
        send_within(&app, &stream_body("brief", false), Duration::from_secs(20)).await;

    assert_eq!(status, 200, "the stream was committed before the timeout");
    let data = sse_data(&text);
    assert_ne!(
        data.last().unwrap(),
        "[DONE]",
        "a cut stream must not look complete"
    );
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{last}");
    assert_ne!(
        streamed_text(&data),
        "Hello! How can I help you today?",
        "the stream was cut short"
    );
}

#[tokio::test]
async fn a_stream_silent_past_its_idle_timeout_ends_with_an_error_event() {
    // The first chunk comes at once, then one every 2 s: the deployment
    // allows 300 ms of silence once the stream has begun, and 600 s in all.
    let app = app()
        .config(
            "[models.quiet]\nroute = [{ provider = \"mock\", model = \"m\", stream_idle_timeout_ms = 300 }]\n",
        )
        .spawn()
        .await;
    app.mock()
        .update(|b| b.chunk_delay = Duration::from_secs(2));

    let (status, _, text) =
        send_within(&app, &stream_body("quiet", false), Duration::from_secs(20)).await;

    assert_eq!(
        status, 200,
        "the stream was committed before it fell silent"
    );
    let data = sse_data(&text);
    assert_eq!(data.len(), 2, "the first chunk, then the error: {data:?}");
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    let last: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{last}");

    // A stream whose chunks come within the idle time is not cut.
    app.mock()
        .update(|b| b.chunk_delay = Duration::from_millis(20));
    let (_, _, text) =
        send_within(&app, &stream_body("quiet", false), Duration::from_secs(20)).await;
    assert_eq!(sse_data(&text).last().unwrap(), "[DONE]");
}

/// What a connection gives back until the server closes it (or 10 s pass:
/// then `None`, a connection still held).
async fn until_closed(mut conn: TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

/// A client that sends a request's headers a piece at a time, or nothing at
/// all, or a body shorter than it announced, cannot hold a connection (a
/// task and a socket) forever: `server.read_timeout_secs` closes it, and a
/// body that stops arriving is answered 408.
#[tokio::test]
async fn slow_or_silent_clients_are_cut_off_by_the_read_timeout() {
    use tokio::io::AsyncWriteExt as _;
    let app = app()
        .env("SWITCHYARD_SERVER__READ_TIMEOUT_SECS", "1")
        .spawn()
        .await;

    let silent = TcpStream::connect(app.addr).await.unwrap();
    // `P` may begin HTTP/2's preface: the version is not decided yet.
    let mut one_byte = TcpStream::connect(app.addr).await.unwrap();
    one_byte.write_all(b"P").await.unwrap();
    let mut partial = TcpStream::connect(app.addr).await.unwrap();
    partial
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut short = TcpStream::connect(app.addr).await.unwrap();
    short
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":\"gpt-4o-mini\",",
        )
        .await
        .unwrap();

    let (silent, one_byte, partial, short) = tokio::join!(
        until_closed(silent),
        until_closed(one_byte),
        until_closed(partial),
        until_closed(short)
    );
    assert!(silent.is_some(), "a silent connection was held");
    assert!(
        one_byte.is_some(),
        "a connection that sent one byte was held"
    );
    assert!(
        partial.is_some(),
        "a connection with half its headers was held"
    );
    let short = short.expect("a request with half its body was held");
    assert!(short.starts_with("HTTP/1.1 408"), "{short}");
    assert!(short.contains("\"code\":\"request_timeout\""), "{short}");

    // A client that keeps to the timeout is served as usual.
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status(), 200);
}

/// The body's bound is on its pauses, not its total: a slow client that
/// keeps sending is read to the end, however long the whole takes.
#[tokio::test]
async fn a_slow_body_that_keeps_coming_is_read_to_the_end() {
    use tokio::io::AsyncWriteExt as _;
    let app = app()
        .env("SWITCHYARD_SERVER__READ_TIMEOUT_SECS", "3")
        .spawn()
        .await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini")).unwrap();
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // Four pieces a second apart: the whole takes longer than the timeout,
    // no pause does.
    for piece in body.chunks(body.len().div_ceil(4)) {
        conn.write_all(piece).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let answer = until_closed(conn).await.expect("the answer never came");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
