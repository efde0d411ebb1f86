//! The sentence-embedding engine: all-MiniLM-L6-v2 (a 6-layer BERT, 384
//! dimensions) on the CPU with candle, producing exactly what
//! sentence-transformers produces for this model — the mean of the last
//! hidden states over the attention mask, then L2 normalisation.
//!
//! The BERT forward pass is written here, over packed rows: the tokens of a
//! batch one after another, with no padding at all, since only attention
//! mixes tokens and it stays within each text. The matmuls (Q, K and V
//! stacked into one) go to candle (`Tensor::matmul`, the `gemm` crate);
//! bias, residual, layer norm, GELU, attention and pooling are plain Rust
//! loops over the rows, split across the model's threads. Compared with
//! running candle-nn's layers on a padded `[batch, len]` tensor, this does
//! less work (no padded rows), fuses each bias into the pass that follows,
//! and computes GELU's erf with a branch-free rational function instead of
//! libm's (docs/local.md has the measurements). Tokenisation is the
//! `tokenizers` crate reading the model's own `tokenizer.json` (pure Rust:
//! `fancy-regex`, no Oniguruma, no download support), so ids match the
//! Hugging Face tokenizer by construction.
//!
//! Inputs are sorted by token count and cut into batches of `batch_size`;
//! a text's vector does not depend on what it was batched with. Inputs
//! longer than [`EmbedModel::max_tokens`] are truncated, as
//! sentence-transformers does.
//!
//! Threads: each [`EmbedModel`] owns a dedicated rayon pool of `threads`
//! workers and runs every forward pass inside [`rayon::ThreadPool::install`]:
//! candle's matmul and our row loops run on those workers only, so the
//! engine never uses more than `threads` cores however many callers share
//! it; concurrent [`EmbedModel::embed`] calls queue for the same workers.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

use crate::LocalError;

/// The sentence-transformers `max_seq_length` of all-MiniLM-L6-v2, used when
/// the model folder has no `sentence_bert_config.json` saying otherwise.
const DEFAULT_MAX_TOKENS: usize = 256;

/// How the engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedOptions {
    /// CPU threads for one model, shared by all concurrent calls (at least 1).
    pub threads: usize,
    /// Texts per forward pass (at least 1); 64 by default.
    pub batch_size: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            batch_size: 64,
        }
    }
}

/// The result of one [`EmbedModel::embed`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One unit-length vector of [`EmbedModel::dimensions`] floats per input,
    /// in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model read, after truncation, counting `[CLS]` and `[SEP]`.
    pub prompt_tokens: u32,
}

/// The BERT hyper-parameters we read from `config.json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default)]
    model_type: Option<String>,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".to_owned()
}

/// The optional sentence-transformers side file.
#[derive(Debug, serde::Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// A dense layer: `x · W^T + b`, with `W^T` stored contiguous `[in, out]`
/// for the matmul and the bias kept apart, to be added in the pass that
/// follows (with the residual, the activation or the attention).
struct Dense {
    weight_t: Tensor,
    bias: Vec<f32>,
}

impl Dense {
    fn load(vb: &VarBuilder<'_>, inputs: usize, outputs: usize) -> candle_core::Result<Self> {
        Self::stacked(&[vb], inputs, outputs)
    }

    /// Several dense layers with the same input side by side (`[in, Σ out]`):
    /// Q, K and V become one larger, more efficient matmul.
    fn stacked(
        vbs: &[&VarBuilder<'_>],
        inputs: usize,
        outputs: usize,
    ) -> candle_core::Result<Self> {
        let mut weights = Vec::with_capacity(vbs.len());
        let mut bias = Vec::with_capacity(vbs.len() * outputs);
        for vb in vbs {
            weights.push(vb.get((outputs, inputs), "weight")?);
            bias.extend(vb.get(outputs, "bias")?.to_vec1::<f32>()?);
        }
        let weight_t = Tensor::cat(&weights, 0)?.t()?.contiguous()?;
        Ok(Self { weight_t, bias })
    }

    fn width(&self) -> usize {
        self.bias.len()
    }

    /// `x · W^T + b` for the `rows` rows of `x` (row-major), each output row
    /// then finished by `finish(row, i)` in place (residual, activation,
    /// norm), on the current rayon pool. The product is candle's (the `gemm`
    /// crate); the bias and `finish` read it straight from candle's buffer
    /// into the result, so nothing is copied twice.
    fn apply(
        &self,
        x: Vec<f32>,
        rows: usize,
        finish: impl Fn(&mut [f32], usize) + Sync,
    ) -> candle_core::Result<Vec<f32>> {
        use rayon::prelude::*;
        let inputs = x.len() / rows.max(1);
        let product = Tensor::from_vec(x, (rows, inputs), &Device::Cpu)?.matmul(&self.weight_t)?;
        let (storage, layout) = product.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(candle_core::Error::Msg(
                "the embedding model runs on the CPU".into(),
            ));
        };
        let width = self.width();
        let product = cpu
            .as_slice::<f32>()?
            .get(layout.start_offset()..layout.start_offset() + rows * width)
            .ok_or_else(|| candle_core::Error::Msg("a product of the wrong size".into()))?;
        let mut out = vec![0f32; rows * width];
        out.par_chunks_mut(width)
            .zip(product.par_chunks(width))
            .enumerate()
            .for_each(|(i, (row, p))| {
                for ((o, p), b) in row.iter_mut().zip(p).zip(&self.bias) {
                    *o = p + b;
                }
                finish(row, i);
            });
        Ok(out)
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(vb: &VarBuilder<'_>, width: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: vb.get(width, "weight")?.to_vec1::<f32>()?,
            beta: vb.get(width, "bias")?.to_vec1::<f32>()?,
            eps: eps as f32,
        })
    }

    /// Layer normalisation of one row, in place.
    fn apply(&self, row: &mut [f32]) {
        let n = row.len() as f32;
        let mean = lanes(row, |v| v) / n;
        let var = lanes(row, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    out_norm: Norm,
}

/// all-MiniLM's BERT, run on packed rows: the batch's tokens one after
/// another with no padding, since only attention mixes tokens and it stays
/// within each text. Matmuls go to candle; the rest (bias, residual, layer
/// norm, GELU, attention) is plain Rust over the rows, split across the
/// model's rayon pool.
struct Bert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type0: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    vocab: usize,
    max_positions: usize,
    heads: usize,
    head_dim: usize,
    hidden: usize,
}

/// Σ f(v) with eight running sums, so that the loop vectorises (a single
/// sum is a chain of dependent additions that no compiler may reorder).
fn lanes(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// a · b, vectorised as [`lanes`] is.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// BERT's exact GELU, `x/2 · (1 + erf(x/√2))`.
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf in single precision as Eigen (and XLA) compute it: a rational
/// function of degree 13/8 on [-4, 4], where |erf| reaches 1 in f32. No
/// branches or calls, so the GELU loop vectorises; within 1e-6 of libm's
/// `erff` everywhere (tested), where libm's took a tenth of the forward pass.
fn erf(x: f32) -> f32 {
    const A: [f32; 7] = [
        -1.609_603_3e-2,
        -2.954_6e-3,
        -7.349_906_3e-4,
        -5.692_506_4e-5,
        -2.101_024e-6,
        2.770_681_4e-8,
        -2.726_142_3e-10,
    ];
    const B: [f32; 5] = [
        -1.426_473_9e-2,
        -7.373_329e-3,
        -1.682_827e-3,
        -2.133_740_6e-4,
        -1.456_607_2e-5,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = A[6];
    for a in A[..6].iter().rev() {
        p = p * x2 + a;
    }
    let mut q = B[4];
    for b in B[..4].iter().rev() {
        q = q * x2 + b;
    }
    x * p / q
}

impl Bert {
    fn load(vb: VarBuilder<'_>, cfg: &BertConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let ev = vb.pp("embeddings");
        let table = |name: &str, rows: usize| -> candle_core::Result<Vec<f32>> {
            ev.pp(name)
                .get((rows, h), "weight")?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let word = table("word_embeddings", cfg.vocab_size)?;
        let position = table("position_embeddings", cfg.max_position_embeddings)?;
        let types = table("token_type_embeddings", cfg.type_vocab_size)?;
        let embed_norm = Norm::load(&ev.pp("LayerNorm"), h, eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lv = vb.pp(format!("encoder.layer.{i}"));
            let at = lv.pp("attention");
            let (q, k, v) = (at.pp("self.query"), at.pp("self.key"), at.pp("self.value"));
            layers.push(Layer {
                qkv: Dense::stacked(&[&q, &k, &v], h, h)?,
                attn_out: Dense::load(&at.pp("output.dense"), h, h)?,
                attn_norm: Norm::load(&at.pp("output.LayerNorm"), h, eps)?,
                intermediate: Dense::load(&lv.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                output: Dense::load(&lv.pp("output.dense"), cfg.intermediate_size, h)?,
                out_norm: Norm::load(&lv.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type0: types
                .get(..h)
                .map(<[f32]>::to_vec)
                .unwrap_or_else(|| vec![0.0; h]),
            embed_norm,
            layers,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            hidden: h,
        })
    }

    /// The pooled, normalised embedding of each text (token ids, truncated).
    /// Runs on the current rayon pool.
    fn embed(&self, texts: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        let h = self.hidden;
        let lens: Vec<usize> = texts.iter().map(|t| t.len()).collect();
        let rows: usize = lens.iter().sum();
        if rows == 0 {
            return Ok(vec![vec![0.0; h]; texts.len()]);
        }
        let mut starts = Vec::with_capacity(texts.len());
        let mut at = 0;
        for len in &lens {
            starts.push(at);
            at += len;
        }

        // Embeddings: word + position + token type 0, then layer norm.
        let mut x = vec![0f32; rows * h];
        let tokens: Vec<(u32, usize)> = texts
            .iter()
            .flat_map(|t| t.iter().enumerate().map(|(p, &id)| (id, p)))
            .collect();
        x.par_chunks_mut(h)
            .zip(tokens.par_iter())
            .for_each(|(row, &(id, p))| {
                let id = (id as usize).min(self.vocab - 1);
                let p = p.min(self.max_positions - 1);
                let word = &self.word[id * h..(id + 1) * h];
                let pos = &self.position[p * h..(p + 1) * h];
                for (i, v) in row.iter_mut().enumerate() {
                    *v = word[i] + pos[i] + self.token_type0[i];
                }
                self.embed_norm.apply(row);
            });

        for layer in &self.layers {
            // Q, K, V in one matmul, then attention within each text.
            let qkv = layer.qkv.apply(x.clone(), rows, |_, _| {})?;
            let ctx = self.attention(&qkv, &lens, &starts);

            // Output projection + residual, layer norm.
            let attn = layer.attn_out.apply(ctx, rows, |row, i| {
                for (v, r) in row.iter_mut().zip(&x[i * h..(i + 1) * h]) {
                    *v += r;
                }
                layer.attn_norm.apply(row);
            })?;

            // Feed-forward: GELU (erf), projection + residual, layer norm.
            let inter = layer.intermediate.apply(attn.clone(), rows, |row, _| {
                for v in row.iter_mut() {
                    *v = gelu_erf(*v);
                }
            })?;
            let out = layer.output.apply(inter, rows, |row, i| {
                for (v, r) in row.iter_mut().zip(&attn[i * h..(i + 1) * h]) {
                    *v += r;
                }
                layer.out_norm.apply(row);
            })?;
            x = out;
        }

        // Mean over each text's tokens, then L2 normalisation (as
        // sentence-transformers).
        Ok(lens
            .par_iter()
            .zip(starts.par_iter())
            .map(|(&len, &start)| {
                let mut mean = vec![0f32; h];
                for row in x[start * h..(start + len) * h].chunks(h) {
                    for (m, v) in mean.iter_mut().zip(row) {
                        *m += v;
                    }
                }
                let n = len.max(1) as f32;
                mean.iter_mut().for_each(|m| *m /= n);
                let norm = lanes(&mean, |v| v * v).sqrt().max(1e-12);
                mean.iter_mut().for_each(|m| *m /= norm);
                mean
            })
            .collect())
    }

    /// Softmax attention of each text over its own tokens, every head;
    /// `qkv` rows are `[q | k | v]`, biases added. Returns `[rows, hidden]`.
    fn attention(&self, qkv: &[f32], lens: &[usize], starts: &[usize]) -> Vec<f32> {
        use rayon::prelude::*;
        let (h, nh, hd) = (self.hidden, self.heads, self.head_dim);
        let width = 3 * h;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut ctx = vec![0f32; qkv.len() / 3];
        // One disjoint block of output rows per text.
        let mut blocks = Vec::with_capacity(lens.len());
        let mut rest = ctx.as_mut_slice();
        for &len in lens {
            let (block, tail) = rest.split_at_mut(len * h);
            blocks.push(block);
            rest = tail;
        }
        blocks
            .into_par_iter()
            .zip(lens.par_iter().zip(starts.par_iter()))
            .for_each(|(block, (&len, &start))| {
                let rows = &qkv[start * width..(start + len) * width];
                let mut scores = vec![0f32; len];
                for head in 0..nh {
                    let (qo, ko, vo) = (head * hd, h + head * hd, 2 * h + head * hd);
                    for i in 0..len {
                        let q = &rows[i * width + qo..i * width + qo + hd];
                        let mut max = f32::NEG_INFINITY;
                        for (j, s) in scores.iter_mut().enumerate() {
                            let k = &rows[j * width + ko..j * width + ko + hd];
                            *s = dot(q, k) * scale;
                            max = max.max(*s);
                        }
                        let mut total = 0.0;
                        for s in scores.iter_mut() {
                            *s = (*s - max).exp();
                            total += *s;
                        }
                        let out = &mut block[i * h + head * hd..i * h + head * hd + hd];
                        for (j, s) in scores.iter().enumerate() {
                            let p = s / total;
                            let v = &rows[j * width + vo..j * width + vo + hd];
                            for (o, vv) in out.iter_mut().zip(v) {
                                *o += p * vv;
                            }
                        }
                    }
                }
            });
        ctx
    }
}

/// A loaded embedding model. `Send + Sync`: share it behind an `Arc` and call
/// [`EmbedModel::embed`] from blocking threads.
pub struct EmbedModel {
    bert: Bert,
    tokenizer: Tokenizer,
    pool: rayon::ThreadPool,
    name: String,
    max_tokens: usize,
    threads: usize,
    batch_size: usize,
    layers: usize,
}

impl std::fmt::Debug for EmbedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedModel")
            .field("name", &self.name)
            .field("max_tokens", &self.max_tokens)
            .field("threads", &self.threads)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

fn load_err(what: &'static str, detail: impl std::fmt::Display) -> LocalError {
    LocalError::Load {
        what,
        detail: detail.to_string(),
    }
}

fn infer_err(e: candle_core::Error) -> LocalError {
    LocalError::Inference(e.to_string())
}

impl EmbedModel {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from
    /// `dir` (and `sentence_bert_config.json`, if present, for the maximum
    /// sequence length).
    pub fn load(dir: &Path, options: &EmbedOptions) -> Result<Self, LocalError> {
        if options.threads == 0 {
            return Err(LocalError::Invalid(
                "embedding threads must be at least 1".into(),
            ));
        }
        if options.batch_size == 0 {
            return Err(LocalError::Invalid(
                "embedding batch size must be at least 1".into(),
            ));
        }
        let read = |file: &str, what: &'static str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .map_err(|e| load_err(what, format!("{}: {e}", path.display())))
        };

        let cfg: BertConfig = serde_json::from_str(&read("config.json", "embedding config")?)
            .map_err(|e| load_err("embedding config", e))?;
        if let Some(t) = cfg.model_type.as_deref() {
            if t != "bert" {
                return Err(load_err(
                    "embedding config",
                    format!("model_type {t:?} is not a BERT model"),
                ));
            }
        }
        if cfg.hidden_act != "gelu" {
            return Err(load_err(
                "embedding config",
                format!(
                    "hidden_act {:?} is not supported (only gelu)",
                    cfg.hidden_act
                ),
            ));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(load_err(
                "embedding config",
                "hidden_size is not a multiple of num_attention_heads",
            ));
        }

        let st_path = dir.join("sentence_bert_config.json");
        let max_tokens = match std::fs::read_to_string(&st_path) {
            Ok(text) => serde_json::from_str::<SentenceBertConfig>(&text)
                .map_err(|e| load_err("sentence-transformers config", e))?
                .max_seq_length
                .unwrap_or(DEFAULT_MAX_TOKENS),
            Err(_) => DEFAULT_MAX_TOKENS,
        }
        .min(cfg.max_position_embeddings);

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            load_err(
                "embedding tokenizer",
                format!("{}: {e}", tokenizer_path.display()),
            )
        })?;
        // The file asks for fixed padding to 128 and truncation at 128; the
        // forward pass packs rows unpadded, and truncation is where
        // sentence-transformers truncates.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_err("embedding tokenizer", e))?;

        let device = Device::Cpu;
        let weights_path = dir.join("model.safetensors");
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&weights_path, &device).map_err(|e| {
                load_err(
                    "embedding weights",
                    format!("{}: {e}", weights_path.display()),
                )
            })?;
        // Some exports prefix every name with "bert.".
        let prefixed = !tensors.contains_key("embeddings.word_embeddings.weight")
            && tensors.contains_key("bert.embeddings.word_embeddings.weight");
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let vb = if prefixed { vb.pp("bert") } else { vb };
        let bert = Bert::load(vb, &cfg).map_err(|e| load_err("embedding weights", e))?;

        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("embed-{i}"))
            .build()
            .map_err(|e| load_err("embedding thread pool", e))?;

        let name = dir.file_name().map_or_else(
            || "embedding model".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );

        Ok(Self {
            bert,
            tokenizer,
            pool,
            name,
            max_tokens,
            threads: options.threads,
            batch_size: options.batch_size,
            layers: cfg.num_hidden_layers,
        })
    }

    /// Length of every vector (384 for all-MiniLM-L6-v2).
    pub fn dimensions(&self) -> usize {
        self.bert.hidden
    }

    /// Inputs are truncated to this many tokens, `[CLS]` and `[SEP]` included
    /// (256 for all-MiniLM-L6-v2, its sentence-transformers `max_seq_length`).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The token ids the model reads for `text`: `[CLS] … [SEP]`, truncated
    /// at [`EmbedModel::max_tokens`].
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| LocalError::Inference(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Embeds `texts`, returning one unit vector per text in input order.
    /// Blocking; may be called from several threads at once (they share this
    /// model's thread pool).
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings, LocalError> {
        if texts.is_empty() {
            return Ok(Embeddings {
                vectors: Vec::new(),
                prompt_tokens: 0,
            });
        }
        let encoded = texts
            .iter()
            .map(|t| self.token_ids(t))
            .collect::<Result<Vec<_>, _>>()?;
        let prompt_tokens = encoded.iter().map(Vec::len).sum::<usize>();

        // Longest first, as sentence-transformers orders them: texts of
        // similar length share a batch, which evens out the attention work
        // across threads.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));

        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(self.batch_size) {
            let rows = self.pool.install(|| self.run_batch(chunk, &encoded))?;
            for (&i, row) in chunk.iter().zip(rows) {
                vectors[i] = row;
            }
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
        })
    }

    fn run_batch(
        &self,
        chunk: &[usize],
        encoded: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>, LocalError> {
        let texts: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
        self.bert.embed(&texts).map_err(infer_err)
    }

    /// One line for the startup log.
    pub fn describe(&self) -> String {
        let simd = if candle_core::utils::with_avx() {
            "avx2"
        } else if candle_core::utils::with_neon() {
            "neon"
        } else {
            "no simd"
        };
        format!(
            "{} (BERT, {} layers, {} dims, max {} tokens) on candle CPU f32 ({simd}), {} threads, batches of {}",
            self.name,
            self.layers,
            self.dimensions(),
            self.max_tokens,
            self.threads,
            self.batch_size,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn model_dir() -> Option<PathBuf> {
        let base = std::env::var_os("SWITCHYARD_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
        let dir = base.join("all-MiniLM-L6-v2");
        if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
            Some(dir)
        } else {
            eprintln!("skipping: no all-MiniLM-L6-v2 under {}", base.display());
            None
        }
    }

    fn model(threads: usize) -> Option<EmbedModel> {
        let dir = model_dir()?;
        let opts = EmbedOptions {
            threads,
            batch_size: 64,
        };
        Some(EmbedModel::load(&dir, &opts).unwrap())
    }

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn the_fast_erf_matches_libm() {
        let mut worst = 0f32;
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        for x in [-1e30f32, -10.0, 10.0, 1e30] {
            worst = worst.max((erf(x) - libm::erff(x)).abs());
        }
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn model_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<EmbedModel>();
    }

    #[test]
    fn vectors_are_unit_length_and_384_wide() {
        let Some(m) = model(2) else { return };
        assert_eq!(m.dimensions(), 384);
        assert_eq!(m.max_tokens(), 256);
        let out = m
            .embed(&["Hello world.", "", "Ünïcödé and 中文 text!"])
            .unwrap();
        assert_eq!(out.vectors.len(), 3);
        for v in &out.vectors {
            assert_eq!(v.len(), 384);
            let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "norm {n}");
        }
        assert!(out.prompt_tokens >= 3 * 2);
        eprintln!("{}", m.describe());
    }

    #[test]
    fn similarity_ordering() {
        let Some(m) = model(2) else { return };
        let out = m
            .embed(&[
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "The new movie is awesome.",
            ])
            .unwrap();
        let close = cos(&out.vectors[0], &out.vectors[1]);
        let far = cos(&out.vectors[0], &out.vectors[2]);
        eprintln!("cos(food, bread) = {close}, cos(food, movie) = {far}");
        assert!((close - 0.755).abs() < 0.01, "{close}");
        assert!((far - -0.05).abs() < 0.03, "{far}");
        assert!(close > far);
    }

    #[test]
    fn batch_equals_one_at_a_time() {
        let Some(m) = model(2) else { return };
        let texts = [
            "short",
            "A somewhat longer sentence, with punctuation; and more words than the first.",
            "The quick brown fox jumps over the lazy dog.",
            "",
            "Über naïve café résumé — déjà vu!",
        ];
        let batch = m.embed(&texts).unwrap();
        let mut tokens = 0;
        for (i, t) in texts.iter().enumerate() {
            let one = m.embed(&[t]).unwrap();
            tokens += one.prompt_tokens;
            let d = max_abs_diff(&one.vectors[0], &batch.vectors[i]);
            assert!(d < 1e-5, "text {i}: max diff {d}");
        }
        assert_eq!(tokens, batch.prompt_tokens);

        // Several small batches give the same as one.
        let dir = model_dir().unwrap();
        let small = EmbedModel::load(
            &dir,
            &EmbedOptions {
                threads: 1,
                batch_size: 2,
            },
        )
        .unwrap();
        let again = small.embed(&texts).unwrap();
        for (a, b) in again.vectors.iter().zip(&batch.vectors) {
            assert!(max_abs_diff(a, b) < 1e-5);
        }
    }

    #[test]
    fn long_input_is_truncated() {
        let Some(m) = model(2) else { return };
        let long = "word ".repeat(5000);
        let ids = m.token_ids(&long).unwrap();
        assert_eq!(ids.len(), 256);
        assert_eq!(ids[0], 101);
        assert_eq!(ids[255], 102);
        let out = m.embed(&[&long, "short"]).unwrap();
        assert_eq!(out.vectors.len(), 2);
        assert_eq!(out.prompt_tokens, 256 + 3);
        // Everything past the limit is ignored.
        let longer = format!("{long} and then something else entirely");
        let other = m.embed(&[&longer]).unwrap();
        assert!(max_abs_diff(&other.vectors[0], &out.vectors[0]) < 1e-5);
    }

    #[test]
    fn empty_input_gives_empty_result() {
        let Some(m) = model(1) else { return };
        let out = m.embed(&[]).unwrap();
        assert!(out.vectors.is_empty());
        assert_eq!(out.prompt_tokens, 0);
    }

    #[test]
    fn zero_threads_or_batch_is_invalid() {
        let Some(dir) = model_dir() else { return };
        for (threads, batch_size) in [(0, 64), (1, 0)] {
            let r = EmbedModel::load(
                &dir,
                &EmbedOptions {
                    threads,
                    batch_size,
                },
            );
            assert!(matches!(r, Err(LocalError::Invalid(_))));
        }
        let r = EmbedModel::load(&dir.join("nope"), &EmbedOptions::default());
        assert!(matches!(r, Err(LocalError::Load { .. })));
    }

    #[test]
    fn concurrent_calls_agree() {
        let Some(m) = model(2) else { return };
        let want = m.embed(&["concurrency is fine"]).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| m.embed(&["concurrency is fine"]).unwrap()))
                .collect();
            for h in handles {
                let got = h.join().unwrap();
                assert!(max_abs_diff(&got.vectors[0], &want.vectors[0]) < 1e-6);
            }
        });
    }

    /// Ids from the Hugging Face `tokenizers` Python package on the same
    /// tokenizer.json (`Tokenizer.from_file(...).encode(s).ids`, with the
    /// file's own padding disabled).
    #[test]
    fn token_ids_match_hugging_face() {
        let Some(m) = model(1) else { return };
        for (text, want) in HF_IDS {
            assert_eq!(m.token_ids(text).unwrap(), *want, "{text:?}");
        }
    }

    const HF_IDS: &[(&str, &[u32])] = &[
        (
            "\u{dc}ber na\u{ef}ve caf\u{e9} r\u{e9}sum\u{e9} \u{2014} d\u{e9}j\u{e0} vu!",
            &[
                101, 19169, 15743, 7668, 13746, 1517, 2139, 3900, 24728, 999, 102,
            ],
        ),
        (
            "Hello, world! It's 3.14 (approx.) \u{2014} isn't it?",
            &[
                101, 7592, 1010, 2088, 999, 2009, 1005, 1055, 1017, 1012, 2403, 1006, 22480, 1012,
                1007, 1517, 3475, 1005, 1056, 2009, 1029, 102,
            ],
        ),
        (
            "\u{4e2d}\u{6587}\u{5b57}\u{7b26} and \u{e9}mojis \u{1f970}\u{1f680} tab\there\u{200b}zero-width",
            &[
                101, 1746, 1861, 100, 100, 1998, 7861, 29147, 2483, 100, 21628, 2182, 6290, 2080,
                1011, 9381, 102,
            ],
        ),
        (
            "unaffable [MASK] tokenization\u{2122}",
            &[101, 14477, 20961, 3468, 103, 19204, 3989, 30108, 102],
        ),
        (
            "\u{c5}NGSTR\u{d6}M \u{ab}quoted\u{bb} \u{a3}5,000.00 e-mail@example.com",
            &[
                101, 17076, 15687, 1077, 9339, 1090, 27813, 1010, 2199, 1012, 4002, 1041, 1011,
                5653, 1030, 2742, 1012, 4012, 102,
            ],
        ),
    ];

    #[test]
    fn matches_sentence_transformers_reference() {
        let Some(m) = model(2) else { return };
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/minilm_reference.json"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("skipping: no {path}");
            return;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sentences: Vec<String> = serde_json::from_value(v["sentences"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
        assert_eq!(sentences.len(), want.len());
        let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
        let got = m.embed(&refs).unwrap();
        let mut worst = 0f32;
        for (i, (g, w)) in got.vectors.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len());
            let d = max_abs_diff(g, w);
            worst = worst.max(d);
            assert!(d < 1e-4, "sentence {i} {:?}: max diff {d}", sentences[i]);
        }
        eprintln!(
            "reference: {} sentences, worst diff {worst:e}",
            sentences.len()
        );
    }

    /// `cargo test --release -p switchyard-local embed -- --ignored --nocapture`
    #[test]
    #[ignore = "throughput measurement; run in release"]
    fn embed_throughput() {
        let Some(dir) = model_dir() else { return };
        let words = [
            "the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "outside",
            "quietly", "today", "people", "walked", "home", "after", "work", "through", "park",
        ];
        let sentences: Vec<String> = (0..64)
            .map(|i| {
                (0..10)
                    .map(|j| words[(i * 7 + j * 3) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
                    + "."
            })
            .collect();
        let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
        for threads in [1, 2] {
            let m = EmbedModel::load(
                &dir,
                &EmbedOptions {
                    threads,
                    batch_size: 64,
                },
            )
            .unwrap();
            m.embed(&refs).unwrap(); // warm up
            let rounds = 20;
            let start = std::time::Instant::now();
            let mut tokens = 0;
            for _ in 0..rounds {
                tokens += m.embed(&refs).unwrap().prompt_tokens;
            }
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "threads {threads}: {:.1} sentences/s, {:.0} tokens/s ({} tokens per batch of 64, {:.1} ms per batch)",
                (rounds * 64) as f64 / secs,
                f64::from(tokens) / secs,
                tokens / rounds as u32,
                secs * 1000.0 / rounds as f64,
            );
        }
    }
}
