//! The image spec model: validated once at the provider boundary, so the rest of the facade never
//! sees an unparsed reference or digest.

use base64::Engine as _;
use bytes::Bytes;
use facade_oci::media_types::{self as mt, Compression};
use facade_oci::{Digest, ImageRef};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::proto;

/// What one workspace image is made of.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    /// The workspace's base image.
    pub base_ref: ImageRef,
    /// The IDE image, if any.
    pub ide_ref: Option<ImageRef>,
    /// The supervisor image, if any.
    pub supervisor_ref: Option<ImageRef>,
    /// Further IDE layer images, in order.
    pub ide_layer_refs: Vec<ImageRef>,
    /// Content layers, appended last.
    pub content_layers: Vec<ContentLayer>,
}

/// A content layer of the spec.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ContentLayer {
    /// Downloadable from a URL.
    Remote(RemoteContentLayer),
    /// An uncompressed tar carried in the spec itself.
    Direct {
        /// The tar bytes.
        content: Bytes,
    },
}

/// A content layer at a URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteContentLayer {
    /// http(s) URL of the file.
    pub url: String,
    /// Digest of the file.
    pub digest: Digest,
    /// Digest of the uncompressed tar (equals `digest` for an uncompressed layer).
    pub diff_id: Digest,
    /// Compression of the file.
    pub compression: Compression,
    /// Size of the file.
    pub size: u64,
}

impl ImageSpec {
    /// A digest of the spec's canonical form, for cache keys. Direct layers count by their hash.
    pub fn fingerprint(&self) -> Digest {
        let mut s = String::new();
        let push = |s: &mut String, k: &str, v: &str| {
            s.push_str(k);
            s.push('=');
            s.push_str(&v.len().to_string());
            s.push(':');
            s.push_str(v);
            s.push('\n');
        };
        push(&mut s, "base", &self.base_ref.to_string());
        push(&mut s, "ide", &self.ide_ref.as_ref().map(|r| r.to_string()).unwrap_or_default());
        push(&mut s, "sup", &self.supervisor_ref.as_ref().map(|r| r.to_string()).unwrap_or_default());
        for r in &self.ide_layer_refs {
            push(&mut s, "idelayer", &r.to_string());
        }
        for l in &self.content_layers {
            match l {
                ContentLayer::Remote(r) => push(
                    &mut s,
                    "remote",
                    &format!("{} {} {} {:?} {}", r.url, r.digest, r.diff_id, r.compression, r.size),
                ),
                ContentLayer::Direct { content } => push(&mut s, "direct", Digest::sha256_of(content).as_str()),
            }
        }
        Digest::sha256_of(s.as_bytes())
    }

    /// Validates a spec received over gRPC.
    pub fn from_proto(id: &str, spec: proto::ImageSpec) -> Result<ImageSpec> {
        let layers = spec
            .content_layer
            .into_iter()
            .enumerate()
            .map(|(i, l)| match l.spec {
                Some(proto::content_layer::Spec::Remote(r)) => Ok(RawLayer::Remote {
                    url: r.url,
                    digest: r.digest,
                    diff_id: r.diff_id,
                    media_type: r.media_type,
                    size: r.size,
                }),
                Some(proto::content_layer::Spec::Direct(d)) => Ok(RawLayer::Direct { content: Bytes::from(d.content) }),
                None => Err(invalid(id, format!("contentLayer[{i}] is neither remote nor direct"))),
            })
            .collect::<Result<Vec<_>>>()?;
        validate(id, &spec.base_ref, &spec.ide_ref, &spec.supervisor_ref, &spec.ide_layer_ref, layers)
    }

    /// The wire form of the spec, as a spec server sends it. References come out normalized
    /// (`alpine` → `docker.io/library/alpine:latest`) and remote layers carry the OCI media
    /// type of their compression, so `from_proto(to_proto(s)) == s` though the text may differ
    /// from what the spec's author wrote.
    pub fn to_proto(&self) -> proto::ImageSpec {
        let opt = |r: &Option<ImageRef>| r.as_ref().map(ToString::to_string).unwrap_or_default();
        proto::ImageSpec {
            base_ref: self.base_ref.to_string(),
            ide_ref: opt(&self.ide_ref),
            supervisor_ref: opt(&self.supervisor_ref),
            ide_layer_ref: self.ide_layer_refs.iter().map(ToString::to_string).collect(),
            content_layer: self
                .content_layers
                .iter()
                .map(|l| proto::ContentLayer {
                    spec: Some(match l {
                        ContentLayer::Direct { content } => {
                            proto::content_layer::Spec::Direct(proto::DirectContentLayer { content: content.to_vec() })
                        }
                        ContentLayer::Remote(r) => proto::content_layer::Spec::Remote(proto::RemoteContentLayer {
                            url: r.url.clone(),
                            digest: r.digest.to_string(),
                            diff_id: r.diff_id.to_string(),
                            media_type: mt::layer_type(mt::Family::Oci, r.compression).unwrap_or_default().to_string(),
                            // Sizes past i64::MAX cannot exist on disk; saturate rather than wrap.
                            size: i64::try_from(r.size).unwrap_or(i64::MAX),
                        }),
                    }),
                })
                .collect(),
        }
    }

    /// Parses one spec in protobuf-JSON form (camelCase keys; snake_case accepted, as protobuf
    /// JSON parsers do).
    pub fn from_json_value(id: &str, value: serde_json::Value) -> Result<ImageSpec> {
        let raw: JsonSpec = serde_json::from_value(value).map_err(|e| invalid(id, e.to_string()))?;
        let layers = raw
            .content_layer
            .into_iter()
            .enumerate()
            .map(|(i, l)| match (l.remote, l.direct) {
                (Some(r), None) => {
                    let size = match r.size {
                        None => 0,
                        Some(JsonInt::Num(n)) => n,
                        Some(JsonInt::Str(s)) => s.parse::<i64>().map_err(|_| {
                            invalid(id, format!("contentLayer[{i}].remote.size {s:?} is not an integer"))
                        })?,
                    };
                    Ok(RawLayer::Remote {
                        url: r.url,
                        digest: r.digest,
                        diff_id: r.diff_id,
                        media_type: r.media_type,
                        size,
                    })
                }
                (None, Some(d)) => {
                    let content = decode_base64(&d.content)
                        .ok_or_else(|| invalid(id, format!("contentLayer[{i}].direct.content is not base64")))?;
                    Ok(RawLayer::Direct { content: Bytes::from(content) })
                }
                _ => Err(invalid(id, format!("contentLayer[{i}] must have exactly one of remote, direct"))),
            })
            .collect::<Result<Vec<_>>>()?;
        validate(id, &raw.base_ref, &raw.ide_ref, &raw.supervisor_ref, &raw.ide_layer_ref, layers)
    }
}

fn invalid(id: &str, reason: String) -> Error {
    Error::InvalidSpec { id: id.to_string(), reason }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    STANDARD.decode(s).or_else(|_| URL_SAFE.decode(s)).ok()
}

enum RawLayer {
    Remote { url: String, digest: String, diff_id: String, media_type: String, size: i64 },
    Direct { content: Bytes },
}

fn validate(
    id: &str,
    base_ref: &str,
    ide_ref: &str,
    supervisor_ref: &str,
    ide_layer_refs: &[String],
    layers: Vec<RawLayer>,
) -> Result<ImageSpec> {
    let image = |field: &str, s: &str| -> Result<ImageRef> {
        ImageRef::parse(s).map_err(|e| invalid(id, format!("{field}: {e}")))
    };
    let optional = |field: &str, s: &str| -> Result<Option<ImageRef>> {
        if s.is_empty() { Ok(None) } else { image(field, s).map(Some) }
    };
    if base_ref.is_empty() {
        return Err(invalid(id, "baseRef is empty".into()));
    }
    let content_layers = layers
        .into_iter()
        .enumerate()
        .map(|(i, l)| match l {
            RawLayer::Direct { content } => Ok(ContentLayer::Direct { content }),
            RawLayer::Remote { url, digest, diff_id, media_type, size } => {
                let field = |f: &str| format!("contentLayer[{i}].remote.{f}");
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(invalid(id, format!("{} must be an http(s) URL", field("url"))));
                }
                let digest = Digest::parse(&digest).map_err(|e| invalid(id, format!("{}: {e}", field("digest"))))?;
                let diff_id = if diff_id.is_empty() {
                    digest.clone()
                } else {
                    Digest::parse(&diff_id).map_err(|e| invalid(id, format!("{}: {e}", field("diffId"))))?
                };
                let compression = if media_type.is_empty() {
                    if diff_id == digest { Compression::None } else { Compression::Gzip }
                } else {
                    mt::layer_compression(&media_type).ok_or_else(|| {
                        invalid(id, format!("{} {media_type:?} is not a layer media type", field("mediaType")))
                    })?
                };
                if (compression == Compression::None) != (diff_id == digest) {
                    return Err(invalid(
                        id,
                        format!(
                            "{}: an uncompressed layer's diffId equals its digest, a compressed one's does not",
                            field("diffId")
                        ),
                    ));
                }
                let size = u64::try_from(size).map_err(|_| invalid(id, format!("{} is negative", field("size"))))?;
                Ok(ContentLayer::Remote(RemoteContentLayer { url, digest, diff_id, compression, size }))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageSpec {
        base_ref: image("baseRef", base_ref)?,
        ide_ref: optional("ideRef", ide_ref)?,
        supervisor_ref: optional("supervisorRef", supervisor_ref)?,
        ide_layer_refs: ide_layer_refs
            .iter()
            .enumerate()
            .map(|(i, r)| image(&format!("ideLayerRef[{i}]"), r))
            .collect::<Result<_>>()?,
        content_layers,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSpec {
    #[serde(rename = "baseRef", alias = "base_ref", default)]
    base_ref: String,
    #[serde(rename = "ideRef", alias = "ide_ref", default)]
    ide_ref: String,
    #[serde(rename = "supervisorRef", alias = "supervisor_ref", default)]
    supervisor_ref: String,
    #[serde(rename = "ideLayerRef", alias = "ide_layer_ref", default)]
    ide_layer_ref: Vec<String>,
    #[serde(rename = "contentLayer", alias = "content_layer", default)]
    content_layer: Vec<JsonLayer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLayer {
    remote: Option<JsonRemote>,
    direct: Option<JsonDirect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRemote {
    #[serde(default)]
    url: String,
    #[serde(default)]
    digest: String,
    #[serde(rename = "diffId", alias = "diff_id", default)]
    diff_id: String,
    #[serde(rename = "mediaType", alias = "media_type", default)]
    media_type: String,
    #[serde(default)]
    size: Option<JsonInt>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDirect {
    #[serde(default)]
    content: String,
}

/// protobuf-JSON writes int64 as a string; hand-written files often use a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonInt {
    Num(i64),
    Str(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn parses_protobuf_json() {
        let s = ImageSpec::from_json_value(
            "ws1",
            json!({"baseRef": "127.0.0.1:5000/base:latest", "ideRef": "127.0.0.1:5000/ide:1",
                   "ideLayerRef": ["127.0.0.1:5000/extra:1"],
                   "contentLayer": [
                     {"direct": {"content": "aGVsbG8="}},
                     {"remote": {"url": "https://x.test/l.tar.gz", "digest": D1, "diffId": D2,
                                 "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": "42"}}]}),
        )
        .unwrap();
        assert_eq!(s.base_ref.repository.as_str(), "base");
        assert!(s.supervisor_ref.is_none());
        assert_eq!(s.ide_layer_refs.len(), 1);
        assert_eq!(s.content_layers[0], ContentLayer::Direct { content: Bytes::from_static(b"hello") });
        let ContentLayer::Remote(r) = &s.content_layers[1] else { panic!() };
        assert_eq!((r.size, r.compression), (42, Compression::Gzip));
    }

    #[test]
    fn rejects_bad_specs_with_the_field_named() {
        let cases = [
            (json!({}), "baseRef"),
            (json!({"baseRef": "UPPER"}), "baseRef"),
            (json!({"baseRef": "a", "ideRef": "b@sha256:zz"}), "ideRef"),
            (json!({"baseRef": "a", "bogus": 1}), "bogus"),
            (json!({"baseRef": "a", "contentLayer": [{}]}), "contentLayer[0]"),
            (json!({"baseRef": "a", "contentLayer": [{"remote": {"url": "file:///etc/passwd", "digest": D1}}]}), "url"),
            (
                json!({"baseRef": "a", "contentLayer": [{"remote": {"url": "https://x", "digest": "sha256:x"}}]}),
                "digest",
            ),
            (
                json!({"baseRef": "a", "contentLayer": [{"remote": {"url": "https://x", "digest": D1, "size": -1}}]}),
                "size",
            ),
            (
                json!({"baseRef": "a", "contentLayer": [{"remote": {"url": "https://x", "digest": D1, "diffId": D2, "mediaType": "application/vnd.oci.image.layer.v1.tar"}}]}),
                "diffId",
            ),
            (json!({"baseRef": "a", "contentLayer": [{"direct": {"content": "!!"}}]}), "base64"),
        ];
        for (v, needle) in cases {
            let e = ImageSpec::from_json_value("ws", v.clone()).unwrap_err().to_string();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn proto_and_json_agree() {
        let p = proto::ImageSpec {
            base_ref: "docker.io/library/alpine:3".into(),
            supervisor_ref: "r.test/sup:1".into(),
            content_layer: vec![proto::ContentLayer {
                spec: Some(proto::content_layer::Spec::Direct(proto::DirectContentLayer { content: b"x".to_vec() })),
            }],
            ..Default::default()
        };
        let a = ImageSpec::from_proto("ws", p).unwrap();
        let b = ImageSpec::from_json_value(
            "ws",
            json!({"baseRef": "alpine:3", "supervisorRef": "r.test/sup:1", "contentLayer": [{"direct": {"content": "eA=="}}]}),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn to_proto_round_trips() {
        let s = ImageSpec::from_json_value(
            "ws",
            json!({"baseRef": "alpine:3", "ideRef": "r.test/ide:1", "ideLayerRef": ["r.test/a:1", "r.test/b@sha256:1111111111111111111111111111111111111111111111111111111111111111"],
                   "contentLayer": [
                     {"direct": {"content": "aGVsbG8="}},
                     {"remote": {"url": "https://x.test/l.tar.zst", "digest": D1, "diffId": D2,
                                 "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "size": 7}},
                     {"remote": {"url": "https://x.test/l.tar", "digest": D1, "size": 9}}]}),
        )
        .unwrap();
        let p = s.to_proto();
        assert_eq!(p.base_ref, "docker.io/library/alpine:3");
        assert_eq!(p.supervisor_ref, "");
        assert_eq!(ImageSpec::from_proto("ws", p).unwrap(), s);
    }
}
