//! The `[local]` section: where the built-in models live and how much of the
//! machine they may use, and the default aliases that route to them when no
//! provider is configured. Checking that the files exist is I/O, so the
//! binary does it and calls [`Config::add_local_defaults`] with the answer.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, ModelConfig, ProviderConfig, ProviderKind};
use crate::Config;

/// The upstream model name of the built-in chat model (SmolLM2-135M-Instruct).
pub const LOCAL_CHAT_MODEL: &str = "smollm2-135m-instruct";
/// The upstream model name of the built-in embedding model (all-MiniLM-L6-v2).
pub const LOCAL_EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
/// The provider name the default configuration gives the local models.
pub const LOCAL_PROVIDER: &str = "local";

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChatPrecision {
    #[serde(rename = "attention_f16")]
    AttentionF16,
    F16,
    File,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// With no provider configured at all, serve `local-chat`, `local-embed`,
    /// `default` and `default-embedding` from the local models whose files
    /// are present.
    pub auto: bool,
    /// Directory of the model files (`scripts/fetch-models` fills `./models`).
    pub models_dir: String,
    /// The chat model's GGUF file, relative to `models_dir`.
    pub chat_file: String,
    /// `attention_f16`: run a copy of the chat model with its attention
    /// weights widened to f16 (made once, beside the file): right wherever
    /// the f32 reference is, at nearly the quantised file's speed. `f16`:
    /// every weight widened, the reference's answers exactly, half the
    /// speed. `file`: the file as it is, fastest, wrong more often.
    pub chat_precision: ChatPrecision,
    /// The embedding model's directory (model.safetensors, config.json,
    /// tokenizer.json), relative to `models_dir`.
    pub embedding_dir: String,
    /// CPU threads one inference may use; 0 = every core.
    pub threads: usize,
    /// Chat generations that run at once (each on its own worker thread).
    pub max_concurrent: usize,
    /// Requests that may wait for a worker; past that they are refused at
    /// once with 503 and `Retry-After`, instead of piling up.
    pub queue: usize,
    /// The chat model's context window, in tokens (prompt plus answer).
    pub context_tokens: u32,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: u32,
    /// Embedding inputs per forward pass.
    pub embedding_batch: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            auto: true,
            models_dir: "models".into(),
            chat_file: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            chat_precision: ChatPrecision::AttentionF16,
            embedding_dir: "all-MiniLM-L6-v2".into(),
            threads: 0,
            max_concurrent: 1,
            queue: 16,
            context_tokens: 2048,
            default_max_tokens: 256,
            embedding_batch: 64,
        }
    }
}

impl LocalConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                path: format!("local.{key}"),
                message: message.to_owned(),
            })
        };
        if self.max_concurrent == 0 {
            return bad("max_concurrent", "expected at least 1");
        }
        if self.embedding_batch == 0 {
            return bad("embedding_batch", "expected at least 1");
        }
        if self.context_tokens < 256 {
            return bad("context_tokens", "expected at least 256");
        }
        if self.default_max_tokens == 0 || self.default_max_tokens >= self.context_tokens {
            return bad(
                "default_max_tokens",
                "expected at least 1 and less than context_tokens",
            );
        }
        if self.models_dir.is_empty() || self.chat_file.is_empty() || self.embedding_dir.is_empty()
        {
            return bad("models_dir", "expected non-empty paths");
        }
        Ok(())
    }
}

impl Config {
    /// Whether the default configuration should route to the local models:
    /// `local.auto` is on and no provider is configured, by file or variable.
    pub fn wants_local_defaults(&self) -> bool {
        self.local.auto && self.providers.is_empty()
    }

    /// Adds the provider `local` and the aliases `local-chat` and `default`
    /// (when the chat model is present) and `local-embed` and
    /// `default-embedding` (when the embedding model is), leaving aliases
    /// the configuration already defines alone.
    pub fn add_local_defaults(&mut self, chat: bool, embeddings: bool) {
        if !(chat || embeddings) {
            return;
        }
        self.providers.insert(
            LOCAL_PROVIDER.into(),
            ProviderConfig {
                kind: ProviderKind::Local,
                base_url: String::new(),
                api_key: None,
                connect_timeout_ms: 5_000,
                first_byte_timeout_ms: 60_000,
                timeout_secs: 600,
                stream_idle_timeout_ms: None,
                max_response_mib: crate::config::DEFAULT_MAX_RESPONSE_MIB,
                server_tools: false,
                thinking: Default::default(),
                max_tokens_default: None,
            },
        );
        let mut alias = |name: &str, model: &str| {
            self.models
                .entry(name.into())
                .or_insert_with(|| ModelConfig::single(LOCAL_PROVIDER, model));
        };
        if chat {
            alias("local-chat", LOCAL_CHAT_MODEL);
            alias("default", LOCAL_CHAT_MODEL);
        }
        if embeddings {
            alias("local-embed", LOCAL_EMBEDDING_MODEL);
            alias("default-embedding", LOCAL_EMBEDDING_MODEL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    #[test]
    fn local_defaults_apply_only_without_providers() {
        let mut c = Config::load(None, &Env::new()).unwrap();
        assert!(c.wants_local_defaults());
        c.add_local_defaults(true, true);
        c.validate().unwrap();
        assert_eq!(c.providers["local"].kind, ProviderKind::Local);
        for (alias, model) in [
            ("local-chat", LOCAL_CHAT_MODEL),
            ("default", LOCAL_CHAT_MODEL),
            ("local-embed", LOCAL_EMBEDDING_MODEL),
            ("default-embedding", LOCAL_EMBEDDING_MODEL),
        ] {
            assert_eq!(
                c.models[alias],
                ModelConfig::single("local", model),
                "{alias}"
            );
        }

        let env: Env = [("CHAT_API_BASE".to_owned(), "http://x/v1".to_owned())].into();
        let c = Config::load(None, &env).unwrap();
        assert!(!c.wants_local_defaults());

        let off: Env = [("SWITCHYARD_LOCAL__AUTO".to_owned(), "false".to_owned())].into();
        assert!(!Config::load(None, &off).unwrap().wants_local_defaults());
    }

    #[test]
    fn only_the_models_present_get_aliases() {
        let mut c = Config::load(None, &Env::new()).unwrap();
        c.add_local_defaults(false, true);
        assert!(!c.models.contains_key("local-chat"));
        assert!(!c.models.contains_key("default"));
        assert!(c.models.contains_key("local-embed"));
        let mut none = Config::load(None, &Env::new()).unwrap();
        none.add_local_defaults(false, false);
        assert!(none.providers.is_empty());
    }

    #[test]
    fn a_local_provider_takes_no_base_url_and_known_models_only() {
        let file = "[providers.l]\nkind = \"local\"\nbase_url = \"http://x\"\n";
        let e = Config::load(Some(("f", file)), &Env::new()).unwrap_err();
        assert!(e.to_string().starts_with("providers.l.base_url:"), "{e}");

        let file =
            "[providers.l]\nkind = \"local\"\n[models.m]\nprovider = \"l\"\nmodel = \"gpt-9\"\n";
        let e = Config::load(Some(("f", file)), &Env::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "models.m.model: the local provider serves `smollm2-135m-instruct` (chat) and `all-minilm-l6-v2` (embeddings), not `gpt-9`"
        );

        let file = "[providers.l]\nkind = \"local\"\n[models.m]\nprovider = \"l\"\nmodel = \"smollm2-135m-instruct\"\n";
        Config::load(Some(("f", file)), &Env::new()).unwrap();
    }

    #[test]
    fn local_limits_are_validated() {
        for (var, path) in [
            ("SWITCHYARD_LOCAL__MAX_CONCURRENT", "local.max_concurrent"),
            ("SWITCHYARD_LOCAL__EMBEDDING_BATCH", "local.embedding_batch"),
            (
                "SWITCHYARD_LOCAL__DEFAULT_MAX_TOKENS",
                "local.default_max_tokens",
            ),
        ] {
            let env: Env = [(var.to_owned(), "0".to_owned())].into();
            let e = Config::load(None, &env).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{path}:")), "{e}");
        }
    }
}
