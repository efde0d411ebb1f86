//! The Rust side of `bench/local.sh`: the same measurements as
//! `bench/local/baseline.py`, on the same inputs, one JSON line each.
//!
//!   bench chat  MODEL.gguf THREADS PROMPT_FILE MAX_TOKENS RUNS [attention_f16|f16|file]
//!   bench embed MODEL_DIR  THREADS SENTENCES_FILE COUNT BATCH
//!
//! chat: greedy, the prompt as the only user message through the model's
//! template, from an empty cache every run (a new context per call), after
//! one untimed warm-up; ttft = start → first sampled token, decode =
//! (generated − 1) / (last token − first token); medians over RUNS.
//! embed: all COUNT sentences in batches of BATCH, after one warm-up batch,
//! median of 3.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use switchyard_local::chat::{ChatMessage, ChatModel, ChatOptions, GenerateRequest, Role};
use switchyard_local::embed::{EmbedModel, EmbedOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("chat") => chat(&args[1..]),
        Some("embed") => embed(&args[1..]),
        _ => panic!("usage: bench chat|embed …"),
    }
}

fn chat(a: &[String]) {
    let (path, threads, prompt, max_tokens, runs) = (
        Path::new(&a[0]),
        a[1].parse::<usize>().unwrap(),
        std::fs::read_to_string(&a[2]).unwrap(),
        a[3].parse::<u32>().unwrap(),
        a[4].parse::<usize>().unwrap(),
    );
    use switchyard_local::convert::{widened_copy, Widen};
    let precision = a.get(5).map_or("attention_f16", String::as_str);
    let run_path = match precision {
        "attention_f16" => widened_copy(path, Widen::Attention).unwrap(),
        "f16" => widened_copy(path, Widen::All).unwrap(),
        _ => path.to_path_buf(),
    };
    let model = ChatModel::load(
        &run_path,
        &ChatOptions {
            threads,
            context_tokens: 2048,
        },
    )
    .unwrap();
    let req = GenerateRequest::greedy(
        vec![ChatMessage::new(Role::User, prompt.trim())],
        max_tokens,
    );
    let mut text = String::new();
    let warm = model
        .generate(&req, &mut |t| {
            text.push_str(t);
            ControlFlow::Continue(())
        })
        .unwrap();
    let (mut ttfts, mut decodes) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let g = model
            .generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(g.completion_tokens, warm.completion_tokens);
        let decode_time = g.total_time.saturating_sub(g.time_to_first_token);
        ttfts.push(g.time_to_first_token.as_secs_f64() * 1e3);
        decodes.push(f64::from(g.completion_tokens.saturating_sub(1)) / decode_time.as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "llama", "engine": format!("switchyard-local (llama.cpp via llama-cpp-2, {precision})"),
            "model": run_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "threads": threads, "runs": runs,
            "prompt_tokens": warm.prompt_tokens, "generated_tokens": warm.completion_tokens,
            "ttft_ms_median": (median(ttfts.clone()) * 100.0).round() / 100.0,
            "decode_tok_s_median": (median(decodes.clone()) * 100.0).round() / 100.0,
            "ttft_ms_all": ttfts, "decode_tok_s_all": decodes,
            "answer_head": text.chars().take(120).collect::<String>(),
        })
    );
}

fn embed(a: &[String]) {
    let (dir, threads, file, count, batch) = (
        Path::new(&a[0]),
        a[1].parse::<usize>().unwrap(),
        std::fs::read_to_string(&a[2]).unwrap(),
        a[3].parse::<usize>().unwrap(),
        a[4].parse::<usize>().unwrap(),
    );
    let sentences: Vec<&str> = file.lines().take(count).collect();
    assert_eq!(sentences.len(), count);
    let model = EmbedModel::load(
        dir,
        &EmbedOptions {
            threads,
            batch_size: batch,
        },
    )
    .unwrap();
    model.embed(&sentences[..batch.min(count)]).unwrap();
    let mut secs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let out = model.embed(&sentences).unwrap();
        secs.push(started.elapsed().as_secs_f64());
        assert_eq!(out.vectors.len(), count);
    }
    let med = median(secs.clone());
    println!(
        "{}",
        serde_json::json!({
            "bench": "st", "engine": "switchyard-local (candle, f32)",
            "threads": threads, "batch": batch, "sentences": count,
            "sentences_per_s_median": ((count as f64 / med) * 10.0).round() / 10.0,
            "secs_all": secs,
        })
    );
}
