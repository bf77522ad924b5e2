//! `make run`: a facade serving a composed demo workspace image.
//!
//! Starts a local upstream registry (CNCF distribution), builds a small base image (Docker
//! schema 2, as most bases are) and a demo "IDE" image (OCI, with GITPOD_ENV_* variables) from
//! local bytes, pushes them with skopeo, writes a `fixed` spec and a facade config, starts the
//! facade and prints the commands that pull the composed image. Ctrl-C stops everything.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use test_support::image::{
    BuiltImage, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, push_image,
};
use test_support::proc::{free_port, wait_for_tcp};
use test_support::registry::Registry;

/// Command-line options.
struct Args {
    facade: PathBuf,
    port: Option<u16>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args { facade: PathBuf::from("target/release/registry-facade"), port: None };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--facade" => parsed.facade = PathBuf::from(args.next().context("--facade needs a path")?),
            "--port" => parsed.port = Some(args.next().context("--port needs a number")?.parse().context("--port")?),
            other => anyhow::bail!("unknown argument {other:?} (use --facade PATH, --port N)"),
        }
    }
    Ok(parsed)
}

/// A small Docker schema 2 base (most bases are) and an OCI "IDE" image with `GITPOD_ENV_*`.
fn demo_images() -> (BuiltImage, BuiltImage) {
    let base = ImageBuilder::new()
        .layer(build_layer(
            &[
                FileEntry::file("etc/os-release", "NAME=\"registry-facade demo base\"\nID=demo\n"),
                FileEntry::exec("usr/local/bin/hello", "#!/bin/sh\necho hello from the demo base image\n"),
            ],
            LayerCompression::Gzip,
        ))
        .env(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"])
        .run_config_extra("Cmd", serde_json::json!(["/bin/sh"]))
        .created("2024-01-01T00:00:00Z")
        .build();
    let ide = ImageBuilder::new()
        .layer(build_layer(
            &[FileEntry::exec("ide/bin/demo-ide", "#!/bin/sh\necho demo IDE running in \"$PWD\"\n")],
            LayerCompression::Gzip,
        ))
        .env(["GITPOD_ENV_APPEND_PATH=/ide/bin:", "GITPOD_ENV_SET_EDITOR=/ide/bin/demo-ide", "IGNORED_BY_THE_FACADE=1"])
        .created("2024-01-01T00:00:00Z")
        .build();
    (base, ide)
}

/// Writes the `fixed` spec and the facade config under `work`; returns the config path and
/// the metrics port.
fn write_demo_config(work: &Path, host: &str, port: u16) -> anyhow::Result<(PathBuf, u16)> {
    let content =
        build_tar(&[FileEntry::file("workspace/README.md", "# Demo workspace\nComposed by registry-facade.\n")]);
    let specs = serde_json::json!({
        "demo": {
            "baseRef": format!("{host}/demo/base:latest"),
            "ideRef": format!("{host}/demo/ide:latest"),
            "contentLayer": [{"direct": {"content": base64::engine::general_purpose::STANDARD.encode(&content)}}]
        }
    });
    std::fs::write(work.join("specs.json"), serde_json::to_vec_pretty(&specs)?)?;
    let (metrics_port, ready_port) = (free_port(), free_port());
    let config = serde_json::json!({
        "registry": {"port": port, "store": work.join("store"), "fixedSpecFN": work.join("specs.json")},
        "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
        "readinessProbeAddr": format!("127.0.0.1:{ready_port}"),
        "facade": {"listenHost": "127.0.0.1"}
    });
    let config_path = work.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    Ok((config_path, metrics_port))
}

fn print_usage(host: &str, port: u16, metrics_port: u16, work: &Path) {
    let image = format!("127.0.0.1:{port}/fixed/demo:latest");
    println!();
    println!("registry-facade is serving the composed demo workspace image {image}");
    println!("  base  {host}/demo/base:latest + IDE {host}/demo/ide:latest + a direct content layer");
    println!();
    println!("Pull it:");
    println!("  skopeo copy --src-tls-verify=false docker://{image} oci:/tmp/demo-image:latest");
    println!("  ctr images pull --plain-http {image}      # with a running containerd");
    println!("Look at it:");
    println!("  skopeo inspect --tls-verify=false docker://{image}");
    println!("  curl -s http://127.0.0.1:{port}/v2/fixed/demo/manifests/latest");
    println!("  curl -s http://127.0.0.1:{metrics_port}/metrics | grep registry_facade_");
    println!();
    println!(
        "Config: {}  Specs: {}  (Ctrl-C stops the facade and the registry)",
        work.join("config.json").display(),
        work.join("specs.json").display()
    );
}

fn main() -> anyhow::Result<()> {
    let Args { facade, port } = parse_args()?;
    let work = PathBuf::from(".demo");
    std::fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;

    eprintln!("demo: starting the upstream registry (docker-registry)…");
    let reg = Registry::start().context("starting docker-registry")?;
    let host = reg.host();
    let (base, ide) = demo_images();
    eprintln!("demo: pushing demo/base:latest (Docker schema 2) and demo/ide:latest (OCI) to {host}…");
    push_image(&reg, "demo/base:latest", &base, PushFormat::DockerV2S2).context("pushing the base image")?;
    push_image(&reg, "demo/ide:latest", &ide, PushFormat::Oci).context("pushing the IDE image")?;

    let port = port.unwrap_or_else(free_port);
    let (config_path, metrics_port) = write_demo_config(&work, &host, port)?;
    eprintln!("demo: starting {} run {}", facade.display(), config_path.display());
    let mut child = Command::new(&facade)
        .arg("run")
        .arg(&config_path)
        .spawn()
        .with_context(|| format!("starting {}", facade.display()))?;
    wait_for_tcp(([127, 0, 0, 1], port).into(), Duration::from_secs(20))
        .context("the facade did not start listening")?;
    print_usage(&host, port, metrics_port, &work);

    let started = Instant::now();
    let status = child.wait()?;
    drop(reg);
    if !status.success() && started.elapsed() > Duration::from_secs(1) {
        eprintln!("demo: facade exited with {status}");
    }
    Ok(())
}
