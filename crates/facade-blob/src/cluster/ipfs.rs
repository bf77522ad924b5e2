//! A small client of the IPFS node's RPC API (the Kubo HTTP API, which js-ipfs speaks too):
//! `add` a verified blob from a local file, and `cat` it back with offset and length.
//!
//! Node quirks this client copes with (both Kubo and js-ipfs 0.66 must work):
//! - the RPC API is POST-only;
//! - `add` answers newline-delimited JSON whose `Size` is a string in Kubo and a number in
//!   js-ipfs, and whose `Hash` prints CIDv1 in base58btc unless `cid-base=base32` is asked for
//!   (and some versions ignore that), so both bases are accepted;
//! - `cat` of a CID the node does not have blocks until the request's `timeout` expires (or
//!   forever without one), so every `cat` carries `&timeout=`, and the client has its own
//!   first-byte and between-chunks deadlines on top.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::{Error, Result};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Knobs of the IPFS client.
#[derive(Clone, Debug)]
pub struct IpfsConfig {
    /// The RPC API's base URL (`http://host:port`), see [`api_url_from_multiaddr`].
    pub api: String,
    /// Longest wait for the response headers and first byte of a `cat`.
    pub first_byte_timeout: Duration,
    /// Longest gap between two body chunks of a `cat` before it counts as broken.
    pub read_timeout: Duration,
    /// The node-side `timeout` of a `cat` (how long it may look for blocks it lacks).
    pub node_timeout: Duration,
    /// Deadline of a whole `add` (it streams the blob, so it scales with size).
    pub add_timeout: Duration,
}

impl IpfsConfig {
    /// Defaults for the node at `api`.
    pub fn new(api: impl Into<String>) -> Self {
        IpfsConfig {
            api: api.into(),
            first_byte_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(5),
            node_timeout: Duration::from_secs(3),
            add_timeout: Duration::from_secs(600),
        }
    }
}

/// What `add` stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Added {
    /// The CID, as the node printed it.
    pub cid: String,
    /// The size the node reported (the file's size for raw leaves, DAG size otherwise).
    pub size: Option<u64>,
}

/// The IPFS node as a blob store.
#[derive(Clone, Debug)]
pub struct IpfsStore {
    api: String,
    config: IpfsConfig,
    client: HyperClient<HttpConnector, Body>,
}

/// The multiaddr of an RPC API (`/ip4/A/tcp/P`, `/ip6/A/tcp/P`, `/dns4/H/tcp/P`, `/dns6/…`,
/// `/dns/…`, optionally ending in `/http`) or an `http://host:port` URL, as a base URL.
pub fn api_url_from_multiaddr(addr: &str) -> std::result::Result<String, String> {
    let addr = addr.trim();
    if let Some(rest) = addr.strip_prefix("http://") {
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            return Err(format!("{addr:?} is not http://host:port"));
        }
        return Ok(format!("http://{hostport}"));
    }
    let parts: Vec<&str> = addr.split('/').collect();
    let bad = || format!("{addr:?} is not a multiaddr like /ip4/127.0.0.1/tcp/5001 or /dns4/ipfs/tcp/5001");
    let (proto, host, tcp, port, tail) = match parts.as_slice() {
        ["", proto, host, tcp, port] => (*proto, *host, *tcp, *port, None),
        ["", proto, host, tcp, port, tail] => (*proto, *host, *tcp, *port, Some(*tail)),
        _ => return Err(bad()),
    };
    if tcp != "tcp" || host.is_empty() || !matches!(tail, None | Some("http")) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = match proto {
        "ip4" => host.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?.to_string(),
        "ip6" => format!("[{}]", host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?),
        "dns" | "dns4" | "dns6" => {
            if !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                return Err(bad());
            }
            host.to_string()
        }
        _ => return Err(bad()),
    };
    Ok(format!("http://{host}:{port}"))
}

fn err(context: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::Cluster { dependency: "ipfs", context: context.into(), reason: reason.to_string() }
}

/// Whether `s` looks like a CID we can pass back to the node: CIDv0 (`Qm…`, base58btc) or
/// CIDv1 in base32 (`b…`) or base58btc (`z…`). Anything else is garbage from the node.
fn is_plausible_cid(s: &str) -> bool {
    let alnum = !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric());
    alnum
        && (s.starts_with("Qm") && s.len() == 46
            || s.starts_with('b') && s.len() > 8
            || s.starts_with('z') && s.len() > 8)
}

/// Picks the CID out of `add`'s newline-delimited JSON answer.
fn parse_add_response(body: &[u8]) -> std::result::Result<Added, String> {
    let text = std::str::from_utf8(body).map_err(|_| "answer is not UTF-8".to_string())?;
    let mut found = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("answer line is not JSON: {e}"))?;
        if let Some(msg) = v.get("Message").and_then(|m| m.as_str())
            && v.get("Hash").is_none()
        {
            return Err(format!("node error: {msg}"));
        }
        let Some(hash) = v.get("Hash").and_then(|h| h.as_str()) else { continue };
        let size = match v.get("Size") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        found = Some(Added { cid: hash.to_string(), size });
    }
    let added = found.ok_or_else(|| "answer has no Hash".to_string())?;
    if !is_plausible_cid(&added.cid) {
        return Err(format!("answer's Hash {:?} is not a CID", added.cid));
    }
    Ok(added)
}

const BOUNDARY: &str = "registry-facade-blob-5a1c0f3e9d";

impl IpfsStore {
    /// A client of the node at `config.api`. Connects lazily.
    pub fn new(config: IpfsConfig) -> Result<Self> {
        let api = config.api.trim_end_matches('/').to_string();
        if !api.starts_with("http://") {
            return Err(err("configuring", format!("API URL {api:?} is not http://host:port")));
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.first_byte_timeout));
        http.set_nodelay(true);
        let client = HyperClient::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(http);
        Ok(IpfsStore { api, config, client })
    }

    /// The API base URL.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// Adds the `size` bytes of `file` (a verified blob: a store file or a fill's spool, read
    /// with `pread`, so a rename or unlink of its path does not disturb the upload), pinned, as
    /// CIDv1 with raw leaves. Streams the file; nothing is buffered whole.
    pub async fn add(&self, file: Arc<std::fs::File>, size: u64) -> Result<Added> {
        let url =
            format!("{}/api/v0/add?pin=true&cid-version=1&raw-leaves=true&cid-base=base32&progress=false", self.api);
        let head = Bytes::from(format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ));
        let tail = Bytes::from(format!("\r\n--{BOUNDARY}--\r\n"));
        let length = head.len() as u64 + size + tail.len() as u64;
        let chunks = file_chunks(file, size);
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(head) })
            .chain(chunks)
            .chain(futures::stream::once(async move { Ok(tail) }))
            .map(|r| r.map(Frame::data));
        let body: Body = BodyExt::boxed_unsync(StreamBody::new(stream));
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
            .header(http::header::CONTENT_LENGTH, length)
            .body(body)
            .map_err(|e| err("add", e))?;
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| err("add", e))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| err("add: reading the answer", e))?.to_bytes();
            if !status.is_success() {
                return Err(err(
                    "add",
                    format!("node answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
                ));
            }
            parse_add_response(&body).map_err(|e| err("add", e))
        };
        tokio::time::timeout(self.config.add_timeout, work)
            .await
            .map_err(|_| err("add", format!("no answer within {:?}", self.config.add_timeout)))?
    }

    /// Asks the node for its version (the breaker's recovery probe).
    pub async fn ping(&self) -> Result<()> {
        let url = format!("{}/api/v0/version", self.api);
        let body: Body = BodyExt::boxed_unsync(Empty::new().map_err(|never: std::convert::Infallible| match never {}));
        let req = http::Request::post(&url).body(body).map_err(|e| err("version", e))?;
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| err("version", e))?;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            if status.is_success() { Ok(()) } else { Err(err("version", format!("node answered {status}"))) }
        };
        tokio::time::timeout(self.config.first_byte_timeout, work)
            .await
            .map_err(|_| err("version", format!("no answer within {:?}", self.config.first_byte_timeout)))?
    }

    /// `POST /api/v0/<path_and_query>` with an empty body: the status and the whole (small)
    /// answer, within `timeout`.
    async fn rpc(&self, what: &str, path_and_query: &str, timeout: Duration) -> Result<(http::StatusCode, Bytes)> {
        let url = format!("{}/api/v0/{path_and_query}", self.api);
        let body: Body = BodyExt::boxed_unsync(Empty::new().map_err(|never: std::convert::Infallible| match never {}));
        let req = http::Request::post(&url).body(body).map_err(|e| err(what, e))?;
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| err(what, e))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| err(what, e))?.to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| err(what, format!("no answer within {timeout:?}")))?
    }

    /// The node's peer ID (`id`): the identity its pins are recorded under, however each
    /// facade addresses the node.
    pub async fn peer_id(&self) -> Result<String> {
        let (status, body) = self.rpc("id", "id", self.config.first_byte_timeout).await?;
        if !status.is_success() {
            return Err(err("id", format!("node answered {status}")));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| err("id", e))?;
        let id = v.get("ID").or_else(|| v.get("id")).and_then(|i| i.as_str()).unwrap_or_default();
        // Peer IDs are base58 or base32 multihashes; anything else would make a strange key.
        if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(err(
                "id",
                format!("answer has no usable ID: {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
            ));
        }
        Ok(id.to_string())
    }

    /// Removes the recursive pin of `cid` (`pin/rm`): `Ok(true)` when it was pinned, `Ok(false)`
    /// when it was not (another facade of the same node removed it first).
    pub async fn unpin(&self, cid: &str) -> Result<bool> {
        if !is_plausible_cid(cid) {
            return Err(err("pin/rm", format!("{cid:?} is not a CID")));
        }
        let (status, body) =
            self.rpc("pin/rm", &format!("pin/rm?arg={cid}&recursive=true"), self.config.first_byte_timeout * 4).await?;
        if status.is_success() {
            return Ok(true);
        }
        // Kubo: "not pinned or pinned indirectly"; js-ipfs: "… is not pinned".
        let text = String::from_utf8_lossy(&body);
        if text.contains("not pinned") {
            return Ok(false);
        }
        Err(err("pin/rm", format!("node answered {status}: {}", &text[..text.len().min(200)])))
    }

    /// Pins `cid` again (`pin/add`), for content whose index entry came back while it was
    /// being unpinned. Bounded by the node-side timeout: blocks already collected are not
    /// looked for on the network.
    pub async fn pin(&self, cid: &str) -> Result<()> {
        if !is_plausible_cid(cid) {
            return Err(err("pin/add", format!("{cid:?} is not a CID")));
        }
        let node_timeout = format!("{}ms", self.config.node_timeout.as_millis().max(1));
        let path = format!("pin/add?arg={cid}&recursive=true&timeout={node_timeout}");
        let (status, body) = self.rpc("pin/add", &path, self.config.node_timeout * 2).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(err(
                "pin/add",
                format!("node answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
            ))
        }
    }

    /// The bytes `[offset, offset + length)` of `cid`. Returns once the node answered with a
    /// success status (within the first-byte deadline); the stream then fails if a gap between
    /// chunks exceeds the read deadline. The stream's content is not verified here: the caller
    /// hashes the whole blob before anything is committed or completed.
    pub async fn cat(&self, cid: &str, offset: u64, length: u64) -> Result<BoxStream<'static, Result<Bytes>>> {
        if !is_plausible_cid(cid) {
            return Err(err("cat", format!("{cid:?} is not a CID")));
        }
        let node_timeout = format!("{}ms", self.config.node_timeout.as_millis().max(1));
        let url = format!("{}/api/v0/cat?arg={cid}&offset={offset}&length={length}&timeout={node_timeout}", self.api);
        let body: Body = BodyExt::boxed_unsync(Empty::new().map_err(|never: std::convert::Infallible| match never {}));
        let req = http::Request::post(&url).body(body).map_err(|e| err("cat", e))?;
        let resp = tokio::time::timeout(self.config.first_byte_timeout, self.client.request(req))
            .await
            .map_err(|_| err("cat", format!("no answer within {:?}", self.config.first_byte_timeout)))?
            .map_err(|e| err("cat", e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = tokio::time::timeout(self.config.read_timeout, resp.into_body().collect())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(err(
                "cat",
                format!("node answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
            ));
        }
        let read_timeout = self.config.read_timeout;
        let body = resp.into_body();
        let stream = futures::stream::try_unfold(body, move |mut body| async move {
            loop {
                let frame = match tokio::time::timeout(read_timeout, body.frame()).await {
                    Err(_) => return Err(err("cat", format!("no bytes for {read_timeout:?}"))),
                    Ok(None) => return Ok(None),
                    Ok(Some(Err(e))) => return Err(err("cat: reading", e)),
                    Ok(Some(Ok(f))) => f,
                };
                match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Ok(Some((data, body))),
                    Ok(_) => continue,
                    Err(frame) => {
                        // js-ipfs and Kubo report errors after the headers in a trailer.
                        if let Some(t) = frame.trailers_ref()
                            && let Some(e) = t.get("x-stream-error")
                        {
                            return Err(err(
                                "cat",
                                format!("node stream error: {}", String::from_utf8_lossy(e.as_bytes())),
                            ));
                        }
                        continue;
                    }
                }
            }
        });
        Ok(stream.boxed())
    }
}

/// The first `size` bytes of `file`, in 1 MiB chunks read off the async threads.
fn file_chunks(file: Arc<std::fs::File>, size: u64) -> BoxStream<'static, std::io::Result<Bytes>> {
    crate::blobs::read::file_range_stream(file, 0, size, size, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiaddrs_map_to_http_urls() {
        for (addr, url) in [
            ("/ip4/127.0.0.1/tcp/5001", "http://127.0.0.1:5001"),
            ("/ip4/10.0.0.7/tcp/5001/http", "http://10.0.0.7:5001"),
            ("/dns4/ipfs.default.svc/tcp/5001", "http://ipfs.default.svc:5001"),
            ("/dns/ipfs/tcp/80", "http://ipfs:80"),
            ("/ip6/::1/tcp/5001", "http://[::1]:5001"),
            ("http://127.0.0.1:5001/", "http://127.0.0.1:5001"),
        ] {
            assert_eq!(api_url_from_multiaddr(addr).as_deref(), Ok(url), "{addr}");
        }
        for bad in [
            "",
            "127.0.0.1:5001",
            "/ip4/127.0.0.1/udp/5001",
            "/ip4/not-an-ip/tcp/5001",
            "/ip4/127.0.0.1/tcp/99999",
            "/dns4/a b/tcp/1",
            "/ip4/127.0.0.1/tcp/5001/https",
            "/unix/tmp/sock",
            "http://h:1/path",
        ] {
            assert!(api_url_from_multiaddr(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn add_answers_with_string_or_number_sizes_and_either_base_parse() {
        let kubo =
            br#"{"Name":"blob","Hash":"bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy","Size":"11"}"#;
        let js = b"{\"Name\":\"blob\",\"Hash\":\"zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA\",\"Size\":11}\n";
        assert_eq!(
            parse_add_response(kubo),
            Ok(Added { cid: "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy".into(), size: Some(11) })
        );
        assert_eq!(
            parse_add_response(js),
            Ok(Added { cid: "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA".into(), size: Some(11) })
        );
        // Progress lines without a Hash are skipped; the last Hash wins.
        let progress = b"{\"Name\":\"blob\",\"Bytes\":262144}\n{\"Name\":\"blob\",\"Hash\":\"QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG\",\"Size\":\"5\"}\n";
        assert_eq!(parse_add_response(progress).unwrap().cid, "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG");
    }

    #[test]
    fn garbage_add_answers_are_errors() {
        for bad in [
            &b""[..],
            b"<html>",
            b"{\"Message\":\"pin: out of space\",\"Code\":0,\"Type\":\"error\"}",
            b"{\"Name\":\"blob\",\"Hash\":\"../../etc\",\"Size\":1}",
            b"{\"Name\":\"blob\",\"Hash\":\"bafy?x=1&arg=2\",\"Size\":1}",
            b"{\"Name\":\"blob\"}",
        ] {
            assert!(parse_add_response(bad).is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn cat_refuses_non_cids_before_any_request() {
        let s = IpfsStore::new(IpfsConfig::new("http://127.0.0.1:1")).unwrap();
        assert!(s.cat("x&arg=y", 0, 1).await.is_err());
    }
}
