//! Drop-in: the config file the reference facade's installer renders starts the real binary
//! unchanged. The file below is written as Go's JSON encoder writes it (two-space indent, keys in
//! the order of the repository's notes on the reference, no `facade` section); everything it
//! names is real: TLS on the registry port, a `remote` spec server over mutual TLS (the binary's
//! own `spec-server`), Redis, a js-ipfs node, static image layers on a CNCF distribution
//! registry. skopeo then pulls a workspace image over verified TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use e2e::http::request;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use test_support::image::{
    BuiltImage, FileEntry, ImageBuilder, LayerCompression, PushFormat, SKOPEO_TIMEOUT, build_layer, build_tar,
    push_image,
};
use test_support::ipfs::Ipfs;
use test_support::proc::{KillOnDrop, free_port, run, run_bytes, wait_for_tcp};
use test_support::redis::Redis;
use test_support::registry::Registry;
use test_support::skopeo;
use test_support::wait;

/// The `registry-facade` binary of this workspace, built now if needed. Cargo builds only the
/// library of a dependency for this test crate, so the binary is asked for explicitly.
fn facade_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "-p",
        "registry-facade",
        "--bin",
        "registry-facade",
        "--locked",
        "--message-format=json",
    ]);
    let out = run(cmd, Duration::from_secs(1800)).unwrap();
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "registry-facade"
                && m["executable"].is_string()
        })
        .map(|m| PathBuf::from(m["executable"].as_str().unwrap()))
        .expect("cargo reported no registry-facade executable")
}

/// PEM files: a CA, the facade's serving certificate (127.0.0.1), the spec server's (for
/// `ws-manager`, the name the reference dials whatever the address) and the facade's client
/// certificate for mutual TLS.
fn write_pki(dir: &Path) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "installer-config test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    std::fs::write(dir.join("ca.crt"), params.self_signed(&key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(params, key);
    for (name, san, usage) in [
        ("registry", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        ("ws-manager", "ws-manager", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", "registry-facade", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.extended_key_usages = vec![usage];
        std::fs::write(dir.join(format!("{name}.crt")), params.signed_by(&key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// The binary's `spec-server` over mutual TLS; its address is the line it prints.
fn start_spec_server(bin: &Path, dir: &Path) -> (KillOnDrop, SocketAddr) {
    let mut child = Command::new(bin)
        .arg("spec-server")
        .arg("--file")
        .arg(dir.join("specs.json"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--tls-crt")
        .arg(dir.join("pki/ws-manager.crt"))
        .arg("--tls-key")
        .arg(dir.join("pki/ws-manager.key"))
        .arg("--tls-client-ca")
        .arg(dir.join("pki/ca.crt"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let proc = KillOnDrop { child, name: "spec-server".into() };
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("spec-server printed no address");
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("spec-server said {line:?}"));
    (proc, addr.parse().unwrap())
}

fn image(files: &[(&str, &str)]) -> BuiltImage {
    let entries: Vec<FileEntry> = files.iter().map(|(p, c)| FileEntry::file(*p, *c)).collect();
    ImageBuilder::new().layer(build_layer(&entries, LayerCompression::Gzip)).build()
}

/// What Go's `json.MarshalIndent(cfg, "", "  ")` writes for the installer's `ServiceConfig`,
/// key for key (`ca` is always written, empty; `pprofAddr` too).
#[allow(clippy::too_many_arguments)]
fn installer_rendering(
    port: u16,
    static_refs: &[String],
    spec_addr: SocketAddr,
    dir: &Path,
    redis: &str,
    ipfs_port: u16,
    pprof: u16,
    prometheus: u16,
    readiness: u16,
) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    let layers: Vec<String> = static_refs
        .iter()
        .map(|r| format!("      {{\n        \"ref\": \"{r}\",\n        \"type\": \"image\"\n      }}"))
        .collect();
    format!(
        r#"{{
  "registry": {{
    "port": {port},
    "prefix": "",
    "staticLayer": [
{layers}
    ],
    "remoteSpecProvider": [
      {{
        "addr": "dns:///{spec_addr}",
        "tls": {{
          "ca": "{client_ca}",
          "crt": "{client_crt}",
          "key": "{client_key}"
        }}
      }}
    ],
    "store": "{store}",
    "requireAuth": false,
    "tls": {{
      "ca": "",
      "crt": "{crt}",
      "key": "{key}"
    }},
    "redis": {{
      "enabled": true,
      "singleHostAddr": "{redis}"
    }},
    "ipfs": {{
      "enabled": true,
      "ipfsAddr": "/ip4/$IPFS_HOST/tcp/{ipfs_port}"
    }}
  }},
  "dockerAuth": "{pull_secret}",
  "pprofAddr": "127.0.0.1:{pprof}",
  "prometheusAddr": "127.0.0.1:{prometheus}",
  "readinessProbeAddr": "127.0.0.1:{readiness}"
}}"#,
        layers = layers.join(",\n"),
        client_ca = p("pki/ca.crt"),
        client_crt = p("pki/client.crt"),
        client_key = p("pki/client.key"),
        store = p("cache"),
        crt = p("pki/registry.crt"),
        key = p("pki/registry.key"),
        pull_secret = p("pull-secret.json"),
    )
}

/// [`wait::until`], failing at once (with the facade's log) when the facade has exited.
fn wait_until(what: &str, timeout: Duration, facade: &mut KillOnDrop, log: &Path, mut f: impl FnMut() -> bool) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let done = wait::poll(timeout, wait::EVERY, || {
        if let Err(e) = facade.check_running() {
            panic!("{e}; log:\n{}", log_text());
        }
        f()
    });
    assert!(done, "timed out after {timeout:?} waiting for {what}; log:\n{}", log_text());
}

/// The log without terminal colours (the binary colours its text log wherever it writes).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_installer_config_starts_the_binary_and_serves_a_pull_over_tls() {
    let bin = facade_binary();
    let reg = Registry::start().unwrap();
    let redis = Redis::start().unwrap();
    let ipfs = Ipfs::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir(dir.join("pki")).unwrap();
    write_pki(&dir.join("pki"));
    // The pull secret the installer mounts: the upstream needs no credentials.
    std::fs::write(dir.join("pull-secret.json"), r#"{"auths": {}}"#).unwrap();

    let host = reg.host();
    let base = e2e::upstream::push_two_layer_base(&reg);
    let ide = image(&[("ide/bin/ide", "#!/bin/sh\n")]);
    push_image(&reg, "ide:1", &ide, PushFormat::Oci).unwrap();
    let mut static_refs = Vec::new();
    let mut static_images = Vec::new();
    for name in ["supervisor", "workspacekit", "docker-up"] {
        let img = image(&[(&format!(".supervisor/{name}") as &str, name)]);
        push_image(&reg, &format!("gitpod/{name}:commit-0123abcd"), &img, PushFormat::Oci).unwrap();
        static_refs.push(format!("{host}/gitpod/{name}:commit-0123abcd"));
        static_images.push(img);
    }
    let content = build_tar(&[FileEntry::file("workspace/README.md", "content of ws-1")]);
    let specs = json!({"ws-1": {
        "baseRef": format!("{host}/base:latest"),
        "ideRef": format!("{host}/ide:1"),
        "contentLayer": [{"direct": {"content": base64::engine::general_purpose::STANDARD.encode(content)}}]
    }});
    std::fs::write(dir.join("specs.json"), specs.to_string()).unwrap();
    let (_spec_server, spec_addr) = start_spec_server(&bin, dir);

    let (port, pprof, prometheus, readiness) = (free_port(), free_port(), free_port(), free_port());
    let text = installer_rendering(
        port,
        &static_refs,
        spec_addr,
        dir,
        &redis.host(),
        ipfs.api.port(),
        pprof,
        prometheus,
        readiness,
    );
    let config: Value = serde_json::from_str(&text).unwrap();
    assert!(config.get("facade").is_none());
    std::fs::write(dir.join("config.json"), &text).unwrap();

    let log = dir.join("facade.log");
    let mut cmd = Command::new(&bin);
    cmd.arg("run")
        .arg(dir.join("config.json"))
        .env("IPFS_HOST", "127.0.0.1")
        // Tests bind loopback only; the installer's file leaves the host to the process.
        .env(registry_facade::config::LISTEN_HOST_ENV, "127.0.0.1")
        .env("RUST_LOG", "info")
        .env_remove("REDIS_PASSWORD");
    let mut facade = KillOnDrop::spawn("registry-facade", cmd, &log).unwrap();
    let registry: SocketAddr = ([127, 0, 0, 1], port).into();
    let probe: SocketAddr = ([127, 0, 0, 1], readiness).into();
    wait_until("the registry port", Duration::from_secs(60), &mut facade, &log, || {
        wait_for_tcp(registry, Duration::from_millis(100)).is_ok()
    });
    // Ready means the spec server answered the readiness probe over mutual TLS.
    wait_until("readiness", Duration::from_secs(60), &mut facade, &log, || {
        wait_for_tcp(probe, Duration::from_millis(100)).is_ok()
            && request(&probe.to_string(), "GET", "/ready", &[], b"").status == 200
    });

    // skopeo verifies the facade's certificate against the test CA: no plain-HTTP fallback.
    let certs = dir.join("skopeo-certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(dir.join("pki/ca.crt"), certs.join("ca.crt")).unwrap();
    let out = dir.join("pulled");
    let mut copy = Command::new("skopeo");
    copy.args(["--insecure-policy", "copy", "--preserve-digests", "--src-cert-dir"])
        .arg(&certs)
        .arg(format!("docker://127.0.0.1:{port}/remote/ws-1:latest"))
        .arg(format!("oci:{}:latest", out.display()));
    if let Err(e) = run_bytes(copy, SKOPEO_TIMEOUT) {
        panic!("skopeo over TLS: {e}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    let pulled = skopeo::read_oci_layout(&out, "latest").unwrap();
    let layers: Vec<&str> =
        pulled.manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect();
    let upstream: Vec<String> = base
        .layers
        .iter()
        .chain(static_images.iter().flat_map(|i| i.layers.iter()))
        .chain(ide.layers.iter())
        .map(|l| l.digest.clone())
        .collect();
    assert_eq!(layers.len(), upstream.len() + 1, "base 2, static 3, IDE 1, content 1: {}", pulled.manifest);
    assert_eq!(&layers[..upstream.len()], upstream.iter().map(String::as_str).collect::<Vec<_>>());
    let fs = pulled.rootfs();
    for (file, want) in [
        ("etc/base-1", "base 1"),
        ("etc/base-2", "base 2"),
        (".supervisor/supervisor", "supervisor"),
        (".supervisor/workspacekit", "workspacekit"),
        (".supervisor/docker-up", "docker-up"),
        ("ide/bin/ide", "#!/bin/sh\n"),
        ("workspace/README.md", "content of ws-1"),
    ] {
        assert_eq!(fs.get(file).map(Vec::as_slice), Some(want.as_bytes()), "{file} in {:?}", fs.keys());
    }

    // Redis and IPFS are the cluster cache the file enabled: the upstream layers get indexed.
    wait_until("the upstream layers in the Redis index", Duration::from_secs(60), &mut facade, &log, || {
        let keys = redis.keys("registry-facade:blob:*").unwrap_or_default();
        upstream.iter().all(|d| keys.contains(&format!("registry-facade:blob:{d}")))
    });
    assert!(ipfs.pins().unwrap().len() >= upstream.len(), "the layers were added to IPFS");

    let metrics = request(&format!("127.0.0.1:{prometheus}"), "GET", "/metrics", &[], b"");
    assert_eq!(metrics.status, 200);
    assert!(String::from_utf8_lossy(&metrics.body).contains("registry_facade_http_requests_total"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pprof)).is_err(),
        "nothing serves pprofAddr; the startup log says what does instead"
    );
    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    let pprof_lines: Vec<&str> = text.lines().filter(|l| l.contains("pprofAddr")).collect();
    assert_eq!(pprof_lines.len(), 1, "one pprof line at startup:\n{text}");
    assert!(pprof_lines[0].contains(&format!("127.0.0.1:{pprof}")) && pprof_lines[0].contains("/metrics"), "{text}");
    assert!(text.contains("tls=true"), "the registry port serves TLS:\n{text}");
    assert!(!text.contains("registry.tls.ca"), "an empty CA is no CA:\n{text}");
}

/// `redis-cli` over TLS as the ACL user the facade is configured with.
fn redis_keys(port: u16, pattern: &str) -> Vec<String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["--tls", "--insecure", "-p", &port.to_string(), "--user", "facade", "--pass", "s3cret"]).args([
        "--no-auth-warning",
        "KEYS",
        pattern,
    ]);
    run(cmd, Duration::from_secs(10)).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

fn metric(prometheus: u16, series: &str) -> Option<f64> {
    let r = request(&format!("127.0.0.1:{prometheus}"), "GET", "/metrics", &[], b"");
    test_support::metrics::series(&String::from_utf8_lossy(&r.body), series)
}

#[test]
fn redis_use_tls_username_and_insecure_skip_verify_reach_the_connection() {
    let bin = facade_binary();
    let reg = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir(dir.join("pki")).unwrap();
    write_pki(&dir.join("pki"));

    // A TLS-only Redis whose certificate names another host and comes from a CA nobody trusts,
    // with the default user off: only `username` + REDIS_PASSWORD get in, and only
    // `insecureSkipVerify` gets past the certificate.
    let redis_port = free_port();
    let conf = format!(
        "port 0\ntls-port {redis_port}\nbind 127.0.0.1\ntls-cert-file {crt}\ntls-key-file {key}\n\
         tls-auth-clients no\nsave \"\"\nappendonly no\nuser default off\nuser facade on >s3cret ~* &* +@all\n",
        crt = dir.join("pki/ws-manager.crt").display(),
        key = dir.join("pki/ws-manager.key").display(),
    );
    std::fs::write(dir.join("redis.conf"), conf).unwrap();
    let mut redis_cmd = Command::new("redis-server");
    redis_cmd.arg(dir.join("redis.conf"));
    let _redis = KillOnDrop::spawn("redis-server", redis_cmd, &dir.join("redis.log")).unwrap();
    wait_for_tcp(([127, 0, 0, 1], redis_port).into(), Duration::from_secs(10)).unwrap();

    let base = image(&[("etc/base", "base")]);
    push_image(&reg, "base:latest", &base, PushFormat::Oci).unwrap();
    let specs = json!({"ws-1": {"baseRef": format!("{}/base:latest", reg.host())}});
    std::fs::write(dir.join("specs.json"), specs.to_string()).unwrap();

    for insecure in [false, true] {
        let (port, prometheus) = (free_port(), free_port());
        // The installer's shape with the keys it writes for a TLS Redis; no certificate for the
        // registry port (all three `tls` keys empty), so it serves plain HTTP.
        let text = format!(
            r#"{{
  "registry": {{
    "port": {port},
    "prefix": "",
    "staticLayer": [],
    "fixedSpecFN": "{specs}",
    "store": "{store}",
    "requireAuth": false,
    "tls": {{
      "ca": "",
      "crt": "",
      "key": ""
    }},
    "redis": {{
      "enabled": true,
      "singleHostAddr": "127.0.0.1:{redis_port}",
      "username": "facade",
      "useTLS": true,
      "insecureSkipVerify": {insecure}
    }}
  }},
  "dockerAuth": "",
  "pprofAddr": "",
  "prometheusAddr": "127.0.0.1:{prometheus}",
  "readinessProbeAddr": ""
}}"#,
            specs = dir.join("specs.json").display(),
            store = dir.join(format!("cache-{insecure}")).display(),
        );
        let config = dir.join(format!("config-{insecure}.json"));
        std::fs::write(&config, text).unwrap();
        let log = dir.join(format!("facade-{insecure}.log"));
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg(&config)
            .env("REDIS_PASSWORD", "s3cret")
            .env(registry_facade::config::LISTEN_HOST_ENV, "127.0.0.1")
            .env("RUST_LOG", "info");
        let mut facade = KillOnDrop::spawn("registry-facade", cmd, &log).unwrap();
        wait_until("the registry port", Duration::from_secs(60), &mut facade, &log, || {
            wait_for_tcp(([127, 0, 0, 1], port).into(), Duration::from_millis(100)).is_ok()
        });
        let out = dir.join(format!("pulled-{insecure}"));
        skopeo::copy_to_oci(&format!("127.0.0.1:{port}/fixed/ws-1:latest"), &out, "latest").unwrap();
        let up = r#"registry_facade_cluster_dependency_up{dependency="redis"}"#;
        if insecure {
            // Without IPFS, Redis shares tag resolutions and compositions.
            wait_until("the composition shared through Redis", Duration::from_secs(30), &mut facade, &log, || {
                !redis_keys(redis_port, "registry-facade:composed:fixed/ws-1:*").is_empty()
            });
            assert_eq!(metric(prometheus, up), Some(1.0));
        } else {
            // The pull went on without the cluster cache; the certificate was refused.
            wait_until("the Redis breaker to open", Duration::from_secs(30), &mut facade, &log, || {
                metric(prometheus, up) == Some(0.0)
            });
            assert!(redis_keys(redis_port, "registry-facade:*").is_empty(), "nothing reached Redis");
        }
    }
}
