//! The `switchyard-mock --listen ADDR` binary, as benchmarks run it: a real
//! process on a free loopback port, speaking the same shapes as the library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// A running `switchyard-mock`; killed when dropped.
struct MockProcess {
    child: Child,
    addr: SocketAddr,
}

impl MockProcess {
    /// Starts the binary on port 0 with these extra arguments and waits
    /// (bounded) for the address it reports.
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-mock"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("switchyard-mock listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Self { child, addr },
            Err(e) => {
                let _ = child.kill();
                panic!("switchyard-mock did not report its address: {e}");
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Posts a chat request, streamed or not.
    async fn chat(&self, stream: bool) -> reqwest::Response {
        client()
            .post(self.url("/v1/chat/completions"))
            .json(&chat(stream))
            .send()
            .await
            .unwrap()
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn chat(stream: bool) -> Value {
    json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn the_binary_serves_chat_streams_and_embeddings_on_the_address_it_is_given() {
    let mock = MockProcess::start(&["--reply", "Hi there friend"]);
    assert!(mock.addr.ip().is_loopback());
    assert_ne!(mock.addr.port(), 0);

    let plain: Value = mock.chat(false).await.json().await.unwrap();
    let stream = mock.chat(true).await;
    let stream_type = stream.headers()["content-type"].clone();
    let stream = stream.text().await.unwrap();
    let embeddings: Value = client()
        .post(mock.url("/v1/embeddings"))
        .json(&json!({"model": "e", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["content"], "Hi there friend");
    assert_eq!(stream_type, "text/event-stream");
    assert!(stream.ends_with("data: [DONE]\n\n"), "{stream}");
    let text: String = stream
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Hi there friend");
    assert_eq!(embeddings["object"], "list");
    let data = embeddings["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
}

#[tokio::test]
async fn the_binary_answers_every_request_with_the_status_it_is_given() {
    let mock = MockProcess::start(&["--status", "503"]);

    let resp = mock.chat(false).await;

    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock: injected status 503");
    assert_eq!(body["error"]["type"], "server_error");
}

#[tokio::test]
async fn the_binary_cuts_streams_after_the_chunks_it_is_given() {
    let mock = MockProcess::start(&["--reset-after-chunks", "2"]);

    let resp = mock.chat(true).await;

    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let mut body = String::new();
    let end = loop {
        match resp.chunk().await {
            Ok(Some(b)) => body.push_str(&String::from_utf8_lossy(&b)),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(end.is_err(), "the body ended cleanly: {body}");
    assert_eq!(body.matches("data: ").count(), 2, "{body}");
    assert!(!body.contains("[DONE]"));
}
