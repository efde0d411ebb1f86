//! Wiring of the built-in local models: the default aliases when no provider
//! is configured and the files are present, and loading the models that the
//! configured aliases use, once, at startup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use switchyard_core::config::ProviderKind;
use switchyard_core::local::{ChatPrecision, LocalConfig, LOCAL_CHAT_MODEL, LOCAL_EMBEDDING_MODEL};
use switchyard_core::Config;
use switchyard_engine::gateway::Adapter;
use switchyard_local::chat::{ChatModel, ChatOptions};
use switchyard_local::convert::{widened_copy, Widen};
use switchyard_local::embed::{EmbedModel, EmbedOptions};
use switchyard_local::{LocalModels, LocalProvider};

fn chat_path(c: &LocalConfig) -> PathBuf {
    Path::new(&c.models_dir).join(&c.chat_file)
}

fn embedding_path(c: &LocalConfig) -> PathBuf {
    Path::new(&c.models_dir).join(&c.embedding_dir)
}

/// With no provider configured, routes the default aliases to the local
/// models whose files are present (`scripts/fetch-models` puts them there).
pub fn apply_defaults(config: &mut Config) {
    if !config.wants_local_defaults() {
        return;
    }
    let chat = chat_path(&config.local).is_file();
    let embed = embedding_path(&config.local)
        .join("model.safetensors")
        .is_file();
    config.add_local_defaults(chat, embed);
}

fn threads(c: &LocalConfig) -> usize {
    if c.threads > 0 {
        return c.threads;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The providers of kind `local`, and whether the aliases use the local
/// chat model and the local embedding model.
fn needed(config: &Config) -> (Vec<&String>, bool, bool) {
    let names: Vec<&String> = config
        .providers
        .iter()
        .filter(|(_, p)| p.kind == ProviderKind::Local)
        .map(|(n, _)| n)
        .collect();
    let uses = |model: &str| {
        config.models.values().any(|m| {
            m.deployments()
                .iter()
                .any(|(_, d)| names.contains(&&d.provider) && d.model == model)
        })
    };
    let (chat, embed) = (uses(LOCAL_CHAT_MODEL), uses(LOCAL_EMBEDDING_MODEL));
    (names, chat, embed)
}

const FETCH_HINT: &str = "run scripts/fetch-models, or set local.models_dir";

/// The files of the local models the aliases use are where the
/// configuration says (what `serve` would find missing, found without
/// loading anything).
pub fn check_files(config: &Config) -> anyhow::Result<()> {
    let (_, need_chat, need_embed) = needed(config);
    let c = &config.local;
    if need_chat {
        let path = chat_path(c);
        anyhow::ensure!(
            path.is_file(),
            "local.models_dir: local chat model {} not found: {FETCH_HINT}",
            path.display()
        );
    }
    if need_embed {
        let path = embedding_path(c);
        anyhow::ensure!(
            path.join("model.safetensors").is_file(),
            "local.models_dir: local embedding model {} not found: {FETCH_HINT}",
            path.display()
        );
    }
    Ok(())
}

/// Loads the local models the aliases use and returns one adapter per
/// provider of kind `local`; empty when there is none.
pub async fn adapters(config: &Config) -> anyhow::Result<HashMap<String, Adapter>> {
    let (names, need_chat, need_embed) = needed(config);
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let local = config.local.clone();
    let models = tokio::task::spawn_blocking(move || load(&local, need_chat, need_embed))
        .await
        .context("loading the local models")??;
    let models = Arc::new(models);
    Ok(names
        .into_iter()
        .map(|name| {
            let p = Arc::new(LocalProvider::new(name, models.clone()));
            let adapter: Adapter = (p.clone(), p);
            (name.clone(), adapter)
        })
        .collect())
}

fn load(c: &LocalConfig, need_chat: bool, need_embed: bool) -> anyhow::Result<LocalModels> {
    let chat = if need_chat {
        let path = chat_path(c);
        anyhow::ensure!(
            path.is_file(),
            "local chat model {} not found: {FETCH_HINT}",
            path.display()
        );
        let started = std::time::Instant::now();
        let run = match c.chat_precision {
            ChatPrecision::AttentionF16 => widened_copy(&path, Widen::Attention)?,
            ChatPrecision::F16 => widened_copy(&path, Widen::All)?,
            ChatPrecision::File => path.clone(),
        };
        let m = ChatModel::load(
            &run,
            &ChatOptions {
                threads: threads(c),
                context_tokens: c.context_tokens,
            },
        )
        .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(
            model = LOCAL_CHAT_MODEL,
            path = %path.display(),
            running = %run.display(),
            load_ms = started.elapsed().as_millis() as u64,
            "local chat model loaded: {}",
            m.describe()
        );
        Some(m)
    } else {
        None
    };
    let embed = if need_embed {
        let path = embedding_path(c);
        anyhow::ensure!(
            path.join("model.safetensors").is_file(),
            "local embedding model {} not found: {FETCH_HINT}",
            path.display()
        );
        let started = std::time::Instant::now();
        let m = EmbedModel::load(
            &path,
            &EmbedOptions {
                threads: threads(c),
                batch_size: c.embedding_batch,
            },
        )
        .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(
            model = LOCAL_EMBEDDING_MODEL,
            path = %path.display(),
            load_ms = started.elapsed().as_millis() as u64,
            "local embedding model loaded: {}",
            m.describe()
        );
        Some(m)
    } else {
        None
    };
    Ok(LocalModels::new(chat, embed, c)?)
}
