//! `switchyard-mock --listen ADDR`: testkit's mock upstream as a process,
//! for benchmarks and manual testing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use switchyard_testkit::mock::{serve_forever, Behavior, FailPattern, Fault};

#[derive(Parser)]
#[command(about = "A mock OpenAI-compatible upstream with injectable latency and faults")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: SocketAddr,
    /// Delay before the response headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Streams: delay before the first chunk, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Streams: delay between chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// The reply text (streamed one word per chunk).
    #[arg(long)]
    reply: Option<String>,
    /// Answer every request with this HTTP status.
    #[arg(long)]
    status: Option<u16>,
    /// Cut every stream after this many chunks.
    #[arg(long)]
    reset_after_chunks: Option<usize>,
    /// Never answer.
    #[arg(long)]
    hang: bool,
    /// Answer this percentage of requests (deterministically: the first N of
    /// every 100) with `--fail-status`.
    #[arg(long, default_value_t = 0)]
    fail_percent: u64,
    #[arg(long, default_value_t = 500)]
    fail_status: u16,
    /// Worker threads (default 1, to leave CPU for what is measured).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    let always = if args.hang {
        Some(Fault::Hang)
    } else if let Some(s) = args.status {
        Some(Fault::Status(s))
    } else {
        args.reset_after_chunks.map(Fault::ResetAfterChunks)
    };
    let mut behavior = Behavior {
        latency: Duration::from_millis(args.latency_ms),
        ttft: Duration::from_millis(args.ttft_ms),
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        always,
        ..Behavior::default()
    };
    if let Some(r) = args.reply {
        behavior.reply = r;
    }
    if args.fail_percent > 0 {
        behavior.fail_pattern = Some(FailPattern {
            status: args.fail_status,
            fail: args.fail_percent.min(100),
            of: 100,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .expect("bind");
        eprintln!(
            "switchyard-mock listening on {}",
            listener.local_addr().expect("addr")
        );
        serve_forever(listener, behavior).await.expect("serve");
    });
}
