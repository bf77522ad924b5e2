//! `GET|HEAD /v2/<provider>/<id>/tags/list`: the one tag a client can pull.
//!
//! `skopeo inspect` (which `make run` suggests) lists tags before it reads the manifest, and
//! other tools do the same. A workspace image has exactly one useful tag, `latest`: any tag
//! names the current composition, so listing more would only invent names.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderValue, Response};

use super::split_name;
use crate::backend::{Backend, BackendError, ErrorKind, LATEST, TagsRequest};
use crate::body::Body;
use crate::edge::Rejection;
use crate::headers;

pub(crate) async fn respond<B: Backend>(backend: &B, name: &str, parts: &Parts) -> Result<Response<Body>, Rejection> {
    let (provider, id) = match split_name(name) {
        Ok(pi) => pi,
        // A bare provider name is a repository nobody can pull from.
        Err(Rejection::NoWorkspace) => return Err(name_unknown(name)),
        Err(e) => return Err(e),
    };
    match backend.workspace_exists(TagsRequest { provider: provider.clone(), id: id.clone() }).await {
        Ok(()) => {}
        Err(e) if matches!(e.kind, ErrorKind::ManifestUnknown | ErrorKind::NameUnknown) => {
            return Err(name_unknown(name));
        }
        Err(e) => return Err(e.into()),
    }
    let full_name = format!("{provider}/{id}");
    let tags = page(&[LATEST], parts.uri.query());
    let body = serde_json::to_vec(&serde_json::json!({ "name": full_name, "tags": tags }))
        .map_err(|e| Rejection::from(BackendError::internal(e.to_string())))?;

    let mut resp = Response::new(Body::full(body.clone()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(headers::JSON));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok(resp)
}

fn name_unknown(name: &str) -> Rejection {
    BackendError::new(ErrorKind::NameUnknown, format!("repository {:?} is not known", super::clip(name))).into()
}

/// The distribution spec's pagination over the lexically sorted `tags`: `last=<tag>` starts
/// after that tag, `n=<count>` returns at most that many. A list this short never needs a
/// `Link` header for a next page unless `n=0`, which asks for none at all. Values that are not
/// numbers are ignored rather than refused, as registries commonly do.
fn page<'a>(tags: &[&'a str], query: Option<&str>) -> Vec<&'a str> {
    let mut n: Option<usize> = None;
    let mut last: Option<String> = None;
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "n" => n = v.parse().ok(),
            "last" => last = Some(percent_decode(v)),
            _ => {}
        }
    }
    tags.iter().copied().filter(|t| last.as_deref().is_none_or(|l| *t > l)).take(n.unwrap_or(usize::MAX)).collect()
}

/// Decodes `%XX` escapes; tags are `[A-Za-z0-9_.-]`, so anything undecodable is kept as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_by_n_and_last() {
        let tags = ["latest"];
        assert_eq!(page(&tags, None), vec!["latest"]);
        assert_eq!(page(&tags, Some("")), vec!["latest"]);
        assert_eq!(page(&tags, Some("n=1")), vec!["latest"]);
        assert_eq!(page(&tags, Some("n=100&last=")), vec!["latest"]);
        assert!(page(&tags, Some("n=0")).is_empty());
        assert!(page(&tags, Some("last=latest")).is_empty());
        assert!(page(&tags, Some("last=m")).is_empty());
        assert_eq!(page(&tags, Some("last=a")), vec!["latest"]);
        assert_eq!(page(&tags, Some("n=x&ns=docker.io")), vec!["latest"]);
        assert_eq!(page(&["a", "b", "c"], Some("last=a&n=1")), vec!["b"]);
        assert_eq!(page(&["a", "b", "c"], Some("last=%61")), vec!["b", "c"]);
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2Db"), "a-b");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz1"), "%zz1");
    }
}
