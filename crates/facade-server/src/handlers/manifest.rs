//! `GET|HEAD /v2/<provider>/<id>/manifests/<tag-or-digest>`.

use facade_oci::{Digest, Reference};
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response};

use super::{digest_value, etag, split_name};
use crate::backend::{Backend, ManifestRequest};
use crate::body::Body;
use crate::edge::Rejection;
use crate::headers;

pub(crate) async fn respond<B: Backend>(
    backend: &B,
    name: &str,
    reference: &str,
    parts: &Parts,
) -> Result<Response<Body>, Rejection> {
    let (provider, id) = split_name(name)?;
    let reference = match Reference::parse(reference) {
        Ok(r) => r,
        Err(e @ facade_oci::Error::InvalidDigest { .. }) => {
            return Err(Rejection::DigestInvalid { reason: e.to_string() });
        }
        // The conformance suite asks for `.INVALID_MANIFEST_NAME` and wants 404, not 400.
        Err(_) => return Err(Rejection::TagInvalid),
    };
    let Accept { types: accept, refuses_all } = accept_list(&parts.headers);
    let manifest = backend
        .manifest(ManifestRequest {
            provider,
            id,
            reference: reference.clone(),
            accept: accept.clone(),
            method_head: parts.method == Method::HEAD,
        })
        .await?;

    if refuses_all || !accepts(&accept, &manifest.media_type) {
        return Err(Rejection::NotAcceptable { accepted: accept, offered: manifest.media_type });
    }
    // Safety net for "a manifest requested by digest is served with exactly those bytes or
    // 404": containerd HEADs by tag and then GETs by digest, and must get identical bytes.
    let digest = match reference {
        Reference::Digest(requested) => {
            if !requested.matches(&manifest.bytes) {
                return Err(Rejection::ManifestDigestMismatch {
                    actual: Digest::sha256_of(&manifest.bytes).to_string(),
                });
            }
            requested
        }
        // containerd resolves tag → digest from Docker-Content-Digest; a wrong one would make
        // the follow-up GET by digest fail, so refuse loudly instead.
        Reference::Tag(_) => {
            if !manifest.digest.matches(&manifest.bytes) {
                return Err(Rejection::BackendDigestWrong {
                    claimed: manifest.digest.to_string(),
                    actual: Digest::sha256_of(&manifest.bytes).to_string(),
                });
            }
            manifest.digest
        }
    };
    let content_type = (!manifest.media_type.is_empty())
        .then(|| HeaderValue::from_str(&manifest.media_type).ok())
        .flatten()
        .ok_or(Rejection::BadHeaderValue { what: "manifest media type" })?;

    let mut resp = Response::new(Body::full(manifest.bytes.clone()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, content_type);
    h.insert(CONTENT_LENGTH, HeaderValue::from(manifest.bytes.len()));
    h.insert(headers::CONTENT_DIGEST, digest_value(&digest));
    h.insert(ETAG, etag(&digest));
    Ok(resp)
}

/// What the client's `Accept` headers allow.
#[derive(Debug, PartialEq)]
pub(crate) struct Accept {
    /// Media types, lowercased, parameters stripped, `q=0` dropped; empty means any.
    types: Vec<String>,
    /// Every listed type had `q=0`: nothing is acceptable (an empty `types` cannot say that).
    refuses_all: bool,
}

pub(crate) fn accept_list(headers: &HeaderMap) -> Accept {
    let mut out = Vec::new();
    let mut refused_any = false;
    for value in headers.get_all(ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut pieces = item.split(';');
            let media_type = pieces.next().unwrap_or("").trim();
            if media_type.is_empty() {
                continue;
            }
            let refused = pieces.any(|p| {
                let p = p.trim();
                let q = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="));
                q.and_then(|q| q.trim().parse::<f32>().ok()).is_some_and(|q| q <= 0.0)
            });
            if refused {
                refused_any = true;
            } else {
                out.push(media_type.to_ascii_lowercase());
            }
        }
    }
    Accept { refuses_all: refused_any && out.is_empty(), types: out }
}

/// Whether a manifest of `media_type` may be served. No Accept, `*/*` and `*` mean any (the
/// reference accepted `*` but not `*/*`).
pub(crate) fn accepts(accept: &[String], media_type: &str) -> bool {
    let offered = media_type.to_ascii_lowercase();
    accept.is_empty()
        || accept.iter().any(|a| {
            a == "*/*"
                || a == "*"
                || *a == offered
                || a.strip_suffix("/*")
                    .is_some_and(|ty| offered.split_once('/').is_some_and(|(offered_ty, _)| offered_ty == ty))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use facade_oci::media_types::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

    fn list(values: &[&str]) -> Vec<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        accept_list(&h).types
    }

    #[test]
    fn collects_all_accept_headers() {
        assert_eq!(
            list(&[
                "application/vnd.oci.image.manifest.v1+json; q=0.5, application/vnd.oci.image.index.v1+json",
                "Application/Vnd.Docker.Distribution.Manifest.V2+json",
                "text/html;q=0, ,",
            ]),
            vec![OCI_MANIFEST.to_string(), OCI_INDEX.to_string(), DOCKER_MANIFEST.to_string()]
        );
        assert!(list(&[]).is_empty());
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static("application/json;q=0"));
        assert_eq!(accept_list(&h), Accept { types: vec![], refuses_all: true });
    }

    #[test]
    fn negotiates() {
        assert!(accepts(&[], OCI_MANIFEST));
        assert!(accepts(&list(&["*/*"]), OCI_MANIFEST));
        assert!(accepts(&list(&["*"]), OCI_MANIFEST));
        assert!(accepts(&list(&["application/*"]), OCI_MANIFEST));
        assert!(!accepts(&list(&["text/*"]), OCI_MANIFEST));
        assert!(accepts(&list(&[OCI_MANIFEST]), OCI_MANIFEST));
        assert!(!accepts(&list(&[OCI_MANIFEST]), DOCKER_MANIFEST));
        assert!(!accepts(&list(&[OCI_INDEX, DOCKER_MANIFEST]), OCI_MANIFEST));
    }
}
