//! `registry-facade`: an image-composing OCI registry facade for workspaces.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use registry_facade::config::{self, ProcessEnv};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "registry-facade", version, about = "Image-composing OCI registry facade for workspaces")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve composed workspace images as configured in CONFIG (JSON).
    Run {
        /// The configuration file.
        config: PathBuf,
    },
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Run { config } => run(config),
    }
}

fn run(path: PathBuf) -> ExitCode {
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("registry-facade: cannot read config {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let base = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let cfg = match config::parse(&text, &base, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registry-facade: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("registry-facade: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let app = match registry_facade::App::build(cfg).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("registry-facade: {e:#}");
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        match app.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("registry-facade: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
