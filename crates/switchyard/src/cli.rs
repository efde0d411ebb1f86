//! The command line: `serve`, `migrate` and `config check`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use switchyard_core::config::Env;
use switchyard_core::Config;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "An AI gateway and chat-orchestration backend"
)]
pub struct Cli {
    /// Configuration file (default: $SWITCHYARD_CONFIG, else ./switchyard.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (listens on server.listen, default 127.0.0.1:8080).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Create, list and revoke API keys (directly in the configured store).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create {
        /// What the key is for.
        #[arg(long)]
        name: String,
        /// admin, service or user.
        #[arg(long, default_value = "user")]
        role: String,
        /// The tenant it belongs to (created if missing).
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The user a `user` key belongs to.
        #[arg(long)]
        user: Option<String>,
        /// Days until it expires (no expiry by default).
        #[arg(long)]
        expires_in_days: Option<u32>,
        /// Require signed requests (X-Timestamp + X-Signature); prints the signing secret.
        #[arg(long)]
        require_signature: bool,
    },
    /// List a tenant's keys (never the keys themselves).
    List {
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Revoke a key by id; it stops working at once on the server that
    /// serves this store (within its credential cache's 60 s elsewhere).
    Revoke {
        id: String,
        #[arg(long, default_value = "default")]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate and print the effective configuration, secrets masked.
    Check,
}

/// Which file to read: the flag, then `SWITCHYARD_CONFIG`, then
/// `./switchyard.toml` when it exists.
pub fn config_path(flag: Option<PathBuf>, env: &Env) -> Option<PathBuf> {
    flag.or_else(|| {
        env.get("SWITCHYARD_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .or_else(|| {
        let default = PathBuf::from("switchyard.toml");
        default.exists().then_some(default)
    })
}

/// Reads the file (if any) and the process environment into a validated config.
pub fn load_config(flag: Option<PathBuf>) -> anyhow::Result<Config> {
    // `vars()` panics on a variable that is not UTF-8, even one that is
    // none of ours: such variables are skipped (none of ours can be one).
    let env: Env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let path = config_path(flag, &env);
    let text = match &path {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let origin = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let file = text.as_deref().map(|t| (origin.as_str(), t));
    #[allow(unused_mut, reason = "changed only with the local feature")]
    let mut config = Config::load(file, &env)?;
    #[cfg(feature = "local")]
    crate::local::apply_defaults(&mut config);
    Ok(config)
}
