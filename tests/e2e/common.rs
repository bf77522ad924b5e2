//! Shared harness of the end-to-end tests: the real facade (in-process, the same code the binary
//! runs) on a free loopback port, configured like production from JSON text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A running facade; stopped on drop.
pub struct Facade {
    /// Registry address.
    pub addr: SocketAddr,
    /// Admin addresses (metrics, readiness).
    pub admin: Vec<SocketAddr>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Facade {
    /// Starts a facade from config JSON; relative paths resolve against `dir`.
    pub fn start(config: &serde_json::Value, dir: &Path) -> anyhow::Result<Facade> {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(filter.as_str()).try_init();
        let cfg = registry_facade::config::parse(&config.to_string(), dir, &registry_facade::config::ProcessEnv)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                match registry_facade::App::build(cfg).await {
                    Ok(app) => {
                        let _ = tx.send(Ok((app.registry_addr(), app.admin_addrs())));
                        app.run(stop).await.unwrap();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        });
        let (addr, admin) = rx.recv_timeout(Duration::from_secs(60))??;
        Ok(Facade { addr, admin, shutdown, thread: Some(thread) })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The (digest, size) of every layer of workspace `ws`'s composed manifest (provider
    /// `fixed`), in manifest order; asserts the manifest is served.
    pub fn manifest_layers(&self, ws: &str) -> Vec<(String, u64)> {
        let r = http::request(&self.host(), "GET", &format!("/v2/fixed/{ws}/manifests/latest"), &[], b"");
        assert_eq!(r.status, 200, "{ws}: {}", String::from_utf8_lossy(&r.body));
        let m: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["digest"].as_str().unwrap().into(), l["size"].as_u64().unwrap()))
            .collect()
    }
}

impl Drop for Facade {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal blocking HTTP/1.1 client for assertions on status, headers and body.
pub mod http {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// A response.
    #[derive(Debug)]
    pub struct Response {
        /// Status code.
        pub status: u16,
        /// Headers, lowercase names.
        pub headers: BTreeMap<String, String>,
        /// Body.
        pub body: Vec<u8>,
    }

    impl Response {
        /// A header's value.
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
        }
        /// The first OCI error code of the body.
        pub fn error_code(&self) -> Option<String> {
            let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
            v["errors"][0]["code"].as_str().map(str::to_string)
        }
    }

    /// Sends one request (Connection: close) and reads the whole response.
    pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no header end");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect::<BTreeMap<_, _>>();
        let mut body = raw[split + 4..].to_vec();
        if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            body = test_support::wire::dechunk(&body);
        }
        Response { status, headers, body }
    }
}

/// Streaming reads for large blobs: hash as bytes arrive instead of holding them.
pub mod stream {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use sha2::{Digest as _, Sha256};

    /// What a streamed GET got.
    #[derive(Debug)]
    pub struct Streamed {
        /// Status code.
        pub status: u16,
        /// `Content-Length`, if sent.
        pub content_length: Option<u64>,
        /// `Content-Range`, if sent.
        pub content_range: Option<String>,
        /// Body bytes received.
        pub received: u64,
        /// sha256 of the body received (`sha256:…`).
        pub digest: String,
        /// Whether the body ended before `Content-Length` (an aborted response).
        pub truncated: bool,
    }

    /// GETs `path`, hashing the body; stops after `max_bytes` when given (a client that goes away).
    pub fn get(addr: &str, path: &str, headers: &[(&str, &str)], max_bytes: Option<u64>) -> std::io::Result<Streamed> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let mut r = BufReader::with_capacity(1 << 20, s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (mut content_length, mut content_range) = (None, None);
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => content_length = v.trim().parse().ok(),
                    "content-range" => content_range = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        let mut h = Sha256::new();
        let mut received = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if max_bytes.is_some_and(|m| received >= m) {
                break;
            }
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            received += n as u64;
        }
        let truncated = content_length.is_some_and(|l| received < l);
        Ok(Streamed {
            status,
            content_length,
            content_range,
            received,
            digest: format!("sha256:{}", hex::encode(h.finalize())),
            truncated,
        })
    }
}

pub use test_support::wire::noise;

/// Upstream images that several tests start from, built and pushed the same way everywhere.
pub mod upstream {
    use test_support::image::{
        BuiltImage, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image,
    };
    use test_support::registry::Registry;

    /// `base:1` (Docker schema 2: `etc/base-file` = "from the base", `PATH=/usr/bin`) and `ide:1`
    /// (OCI: an executable `ide/bin/ide`, `GITPOD_ENV_APPEND_PATH=/ide/bin:`).
    pub fn push_base_and_ide(reg: &Registry) {
        let base = ImageBuilder::new()
            .layer(build_layer(&[FileEntry::file("etc/base-file", "from the base")], LayerCompression::Gzip))
            .env(["PATH=/usr/bin"])
            .build();
        push_image(reg, "base:1", &base, PushFormat::DockerV2S2).unwrap();
        let ide = ImageBuilder::new()
            .layer(build_layer(&[FileEntry::exec("ide/bin/ide", "#!/bin/sh\necho ide\n")], LayerCompression::Gzip))
            .env(["GITPOD_ENV_APPEND_PATH=/ide/bin:"])
            .build();
        push_image(reg, "ide:1", &ide, PushFormat::Oci).unwrap();
    }

    /// `base:latest` (OCI: two gzip layers, `etc/base-1` and `etc/base-2`, `PATH=/usr/bin:/bin`);
    /// returns it.
    pub fn push_two_layer_base(reg: &Registry) -> BuiltImage {
        let base = ImageBuilder::new()
            .layer(build_layer(&[FileEntry::file("etc/base-1", "base 1")], LayerCompression::Gzip))
            .layer(build_layer(&[FileEntry::file("etc/base-2", "base 2")], LayerCompression::Gzip))
            .env(["PATH=/usr/bin:/bin"])
            .build();
        push_image(reg, "base:latest", &base, PushFormat::Oci).unwrap();
        base
    }
}
