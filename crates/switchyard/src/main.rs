//! The `switchyard` binary: parse the command line, load configuration,
//! set up telemetry, run.

use std::process::ExitCode;

/// glibc's allocator showed up at several percent of CPU per proxied request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use switchyard::cli::{load_config, Cli, Command, ConfigCommand};
use switchyard::{shutdown_signal, telemetry, Application};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: configuration error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::Serve | Command::Config { .. }) {
        if let Err(e) = switchyard::preflight(&config) {
            eprintln!("switchyard: configuration error: {e:#}");
            return ExitCode::from(2);
        }
    }
    if let Command::Config {
        command: ConfigCommand::Check,
    } = cli.command
    {
        println!(
            "# effective configuration (secrets masked)\n{}",
            config.to_masked_toml()
        );
        return ExitCode::SUCCESS;
    }
    let _log_guard = telemetry::init_logging(&config.log, !matches!(cli.command, Command::Serve));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => {
                if config.models.is_empty() {
                    tracing::warn!(
                        "no model is configured: run scripts/fetch-models for the built-in local models, set CHAT_API_BASE and CHAT_API_KEY (or OPENAI_API_KEY), or add [providers] and [models] to switchyard.toml"
                    );
                }
                let app = Application::build(&config, telemetry::init_metrics()).await?;
                app.run_until(shutdown_signal()).await
            }
            Command::Migrate => {
                let store = switchyard_store::connect(&config.store).await?;
                store.migrate().await?;
                let applied = store.applied_migrations().await?;
                store.close().await;
                println!("{} store migrated; applied versions: {applied:?}", store.backend());
                Ok(())
            }
            Command::Config { .. } => Ok(()),
            Command::Keys { command } => switchyard::keys::run(&config, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "switchyard failed");
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
