//! The chat model's attention weights widened to f16, once, beside the
//! original file.
//!
//! llama.cpp multiplies quantised weights (Q4_1, Q8_0…) by activations that
//! it first rounds to 8 bits, and for SmolLM2-135M that rounding, in the
//! attention projections, is enough to change answers: from the shipped Q4_1
//! file it answers "What is the capital of France?" with a loop of French
//! words, while the same weights in f32 (the reference) answer "The capital
//! of France is Paris.". Widening only the attention tensors (q, k, v,
//! output: a fifth of the weights) to f16 gives every answer the reference
//! gets right at 0.94 of the quantised file's speed; widening everything
//! gives the reference's text exactly at half the speed (docs/local.md has
//! the measurements). The weights stay the same values either way: a
//! quantised tensor is dequantised and stored as f16, whose products keep
//! the activations in f16.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::LocalError;

/// llama.cpp's `LLAMA_FTYPE_MOSTLY_F16`, for the all-f16 copy.
const FILE_TYPE_F16: u32 = 1;

fn fail(detail: impl std::fmt::Display) -> LocalError {
    LocalError::Load {
        what: "the widened copy of the chat model",
        detail: detail.to_string(),
    }
}

/// Which quantised tensors a copy widens to f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Widen {
    /// The attention projections (`attn_q`, `attn_k`, `attn_v`, `attn_output`).
    Attention,
    /// Every quantised tensor.
    All,
}

impl Widen {
    fn suffix(self) -> &'static str {
        match self {
            Widen::Attention => "attn-f16",
            Widen::All => "f16",
        }
    }

    fn accepts(self, tensor: &str) -> bool {
        match self {
            Widen::Attention => tensor.contains(".attn_"),
            Widen::All => true,
        }
    }
}

/// Where the copy of `src` lives: beside it, or in the temporary directory
/// when that one is not writable.
fn copy_path(src: &Path, dir: &Path, widen: Widen) -> PathBuf {
    let stem = src
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    dir.join(format!("{stem}.{}.gguf", widen.suffix()))
}

/// The all-f16 copy of the GGUF file `src`; see [`widened_copy`].
pub fn f16_copy(src: &Path) -> Result<PathBuf, LocalError> {
    widened_copy(src, Widen::All)
}

/// The copy of the GGUF file `src` with the tensors `widen` names in f16,
/// made if missing or older than `src`. Returns its path.
pub fn widened_copy(src: &Path, widen: Widen) -> Result<PathBuf, LocalError> {
    // One conversion at a time in this process; the others then find it fresh.
    static CONVERTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CONVERTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = src.parent().unwrap_or_else(|| Path::new("."));
    let mut dst = copy_path(src, dir, widen);
    if is_fresh(src, &dst) {
        return Ok(dst);
    }
    let fallback = copy_path(src, &std::env::temp_dir(), widen);
    if is_fresh(src, &fallback) {
        return Ok(fallback);
    }
    let started = std::time::Instant::now();
    let accepts = move |name: &str| widen.accepts(name);
    if let Err(e) = convert_selected(src, &dst, &accepts) {
        tracing::warn!(path = %dst.display(), error = %e, "cannot write the widened copy beside the model; using the temporary directory");
        dst = fallback;
        convert_selected(src, &dst, &accepts)?;
    }
    tracing::info!(
        from = %src.display(),
        to = %dst.display(),
        ms = started.elapsed().as_millis() as u64,
        "made the widened copy of the chat model"
    );
    Ok(dst)
}

fn is_fresh(src: &Path, dst: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(src), modified(dst)), (Some(s), Some(d)) if d >= s)
}

/// Writes `dst` (through a temporary file, so a crash leaves no half file):
/// the tensors of `src`, those that are quantised and that `widen` accepts
/// in f16; f32 tensors (norms) stay f32, as llama.cpp expects. Public for
/// measuring which tensors the answers depend on (`examples/variant.rs`).
pub fn convert_selected(
    src: &Path,
    dst: &Path,
    widen: &dyn Fn(&str) -> bool,
) -> Result<(), LocalError> {
    let mut reader = BufReader::new(File::open(src).map_err(fail)?);
    let content = gguf_file::Content::read(&mut reader).map_err(fail)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    // The order llama.cpp reads them in does not matter; a stable one makes
    // the file reproducible.
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut kept_quantised = false;
    for name in names {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(fail)?;
        let t = match t.dtype() {
            GgmlDType::F32 | GgmlDType::F16 => t,
            _ if !widen(name) => {
                kept_quantised = true;
                t
            }
            _ => {
                let wide = t.dequantize(&Device::Cpu).map_err(fail)?;
                QTensor::quantize(&wide, GgmlDType::F16).map_err(fail)?
            }
        };
        tensors.push((name.clone(), t));
    }
    let mut metadata: Vec<(&str, Value)> = content
        .metadata
        .iter()
        // candle writes with 32-byte alignment; llama.cpp's default.
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| {
            // A mixed file keeps its type: llama.cpp only reports it.
            let v = if k == "general.file_type" && !kept_quantised {
                Value::U32(FILE_TYPE_F16)
            } else {
                v.clone()
            };
            (k.as_str(), v)
        })
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    // Several processes may start on the same models at once (tests do): each
    // writes its own temporary file, and the renames replace whole files.
    let tmp = dst.with_extension(format!("gguf.{}.part", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp).map_err(fail)?);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta, &refs).map_err(fail)?;
        w.into_inner()
            .map_err(|e| fail(e.error()))?
            .sync_all()
            .map_err(fail)?;
        std::fs::rename(&tmp, dst).map_err(fail)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
