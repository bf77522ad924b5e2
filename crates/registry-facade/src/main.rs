//! `registry-facade`: an image-composing OCI registry facade for workspaces.

mod prepare;

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
    /// Point this node's containerd at the facade: write
    /// `<hostfs>/etc/containerd/certs.d/<hostname>:<port>/hosts.toml` and the CA next to it, and
    /// map the host name to 127.0.0.1 in `<hostfs>/etc/hosts`.
    Setup {
        /// Host name or IP the node's containerd reaches the facade at.
        #[arg(long)]
        hostname: String,
        /// The facade's registry port.
        #[arg(long, default_value_t = 31750)]
        port: u16,
        /// The node's root filesystem as mounted here (`/` when run on the node itself).
        #[arg(long)]
        hostfs: PathBuf,
        /// PEM CA of the facade's serving certificate. Default: the CA the installer mounts at
        /// /usr/local/share/ca-certificates/gitpod-ca.crt; with neither, plain HTTP.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Warm a workspace image up before it is pulled: POST
    /// `/v1/workspaces/<provider>/<id>/prepare` to a facade's admin listener (`prometheusAddr`
    /// or `readinessProbeAddr`), then follow its progress until every layer is in the facade's
    /// store. Prints one line per layer and a summary; exits 1 when a layer failed.
    Prepare {
        /// The facade's admin listener, `HOST:PORT`.
        admin_addr: String,
        /// The workspace, `<provider>/<id>` (as in `<facade>/<provider>/<id>:latest`).
        workspace: String,
        /// Give up waiting after this long.
        #[arg(long, default_value = "3h", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Serve image specs from a JSON file over gRPC (`registryfacade.SpecProvider`), for
    /// development and tests of the `remote` provider. Prints `listening on ADDR` on stdout.
    SpecServer {
        /// Specs `{ "<id>": <ImageSpec in protobuf-JSON> }`, the format of `registry.fixedSpecFN`.
        #[arg(long)]
        file: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// PEM certificate: serve TLS.
        #[arg(long, requires = "tls_key")]
        tls_crt: Option<PathBuf>,
        /// PEM key of --tls-crt.
        #[arg(long, requires = "tls_crt")]
        tls_key: Option<PathBuf>,
        /// PEM CA: require client certificates it signed (mutual TLS).
        #[arg(long, requires = "tls_crt")]
        tls_client_ca: Option<PathBuf>,
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
        Command::Setup { hostname, port, hostfs, ca } => {
            match registry_facade::setup::run(&registry_facade::setup::SetupOptions { hostname, port, hostfs, ca }) {
                Ok(path) => {
                    println!("wrote {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("registry-facade setup: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Prepare { admin_addr, workspace, timeout } => {
            match prepare::run(&admin_addr, &workspace, timeout, &mut std::io::stdout()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("registry-facade prepare: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::SpecServer { file, listen, tls_crt, tls_key, tls_client_ca } => {
            spec_server(&file, listen, tls_crt.zip(tls_key), tls_client_ca)
        }
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
    // Blob reads run on the blocking pool; every thread that allocates gets a glibc malloc arena
    // of its own, and the arenas keep freed read buffers. A bounded pool keeps peak RSS bounded
    // on many-core nodes (measured: 16 concurrent pulls, see bench/RESULTS.md). facade-blob's
    // lanes divide it (reads, spool writes, commits, housekeeping); the pool covers them all,
    // plus bcrypt's own threads and a few for the work without a lane (file polls, static
    // layer hashing), so a lane's permit always finds a thread.
    let threads = cfg.lanes.threads() + cfg.limits.auth_check_threads + 4;
    let rt = match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("registry-facade: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let mut app = match registry_facade::App::build(cfg).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("registry-facade: {e:#}");
                return ExitCode::from(2);
            }
        };
        app.watch_config(path, std::time::Duration::from_secs(2));
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

fn spec_server(
    file: &std::path::Path,
    listen: std::net::SocketAddr,
    identity: Option<(PathBuf, PathBuf)>,
    client_ca: Option<PathBuf>,
) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("registry-facade spec-server: {msg}");
        ExitCode::from(2)
    };
    let specs = match facade_spec::FixedSpecProvider::load(file) {
        Ok(s) => s,
        Err(e) => return fail(format!("--file: {e}")),
    };
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("{flag}: cannot read {}: {e}", p.display()))
    };
    let tls = match identity {
        None => None,
        Some((crt, key)) => {
            let files = (|| {
                Ok::<_, String>(facade_spec::ServerTls {
                    cert_pem: read("--tls-crt", &crt)?,
                    key_pem: read("--tls-key", &key)?,
                    client_ca_pem: client_ca.as_deref().map(|p| read("--tls-client-ca", p)).transpose()?,
                })
            })();
            match files {
                Ok(t) => Some(t),
                Err(e) => return fail(e),
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail(format!("--listen: cannot listen on {listen}: {e}")),
        };
        let addr = listener.local_addr().unwrap_or(listen);
        tracing::info!(%addr, workspaces = specs.len(), tls = tls.is_some(), "spec server serving");
        // The one line on stdout, for scripts that started us on port 0 to read the address.
        println!("listening on {addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        match facade_spec::server::serve(listener, specs, tls, wait_for_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e.to_string()),
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
