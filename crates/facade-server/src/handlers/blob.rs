//! `GET|HEAD /v2/<provider>/<id>/blobs/<digest>`: metadata first, content only for GET.

use facade_oci::Digest;
use facade_oci::media_types::OCTET_STREAM;
use http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE, LOCATION, RANGE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::{digest_value, etag, split_name};
use crate::backend::{Backend, BlobContent, BlobRequest, ByteRange};
use crate::body::Body;
use crate::edge::Rejection;
use crate::headers;
use crate::range::{RangeOutcome, parse_range};

pub(crate) async fn respond<B: Backend>(
    backend: &B,
    name: &str,
    digest: &str,
    parts: &Parts,
) -> Result<Response<Body>, Rejection> {
    let (provider, id) = split_name(name)?;
    let digest = Digest::parse(digest).map_err(|e| Rejection::DigestInvalid { reason: e.to_string() })?;
    let blob = backend.blob(BlobRequest { provider, id, digest: digest.clone() }).await?;
    let etag = etag(&digest);

    let opener = match blob.content {
        // Clients follow 307 and resend their Range to the target.
        BlobContent::Redirect(url) => {
            let location =
                HeaderValue::from_str(&url).map_err(|_| Rejection::BadHeaderValue { what: "redirect URL" })?;
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            let h = resp.headers_mut();
            h.insert(LOCATION, location);
            h.insert(CONTENT_LENGTH, HeaderValue::from(0u64));
            h.insert(headers::CONTENT_DIGEST, digest_value(&digest));
            return Ok(resp);
        }
        BlobContent::Stream(opener) => opener,
    };

    let size = blob.size;
    let (status, range) = match requested_range(&parts.headers, &etag, size) {
        RangeOutcome::Unsatisfiable => return Err(Rejection::RangeNotSatisfiable { size }),
        RangeOutcome::Full => (StatusCode::OK, ByteRange::full(size)),
        RangeOutcome::Partial(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
    };
    let len = range.map_or(0, |r| r.len());
    // HEAD never opens content (the reference downloaded whole blobs to answer HEAD), and an
    // empty blob has nothing to open.
    let body = match range {
        Some(r) if parts.method != Method::HEAD => {
            let stream = opener.open(r).await?;
            Body::stream(stream, len, r.start, digest.to_string())
        }
        _ => Body::empty(),
    };

    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(CONTENT_TYPE, content_type(&blob.media_type));
    h.insert(headers::CONTENT_DIGEST, digest_value(&digest));
    // Lazy pullers probe with HEAD before ranging (spegel-org/spegel#660).
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(ETAG, etag);
    if let (StatusCode::PARTIAL_CONTENT, Some(r)) = (status, range) {
        let value = format!("bytes {}-{}/{size}", r.start, r.end_inclusive);
        h.insert(CONTENT_RANGE, HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("")));
    }
    Ok(resp)
}

/// The single `Range` header, honoured only if `If-Range` (when present) names our entity tag.
/// Blobs are content-addressed, so the digest tag is the only validator that can ever match;
/// a date never does (we send no `Last-Modified`).
fn requested_range(headers: &HeaderMap, etag: &HeaderValue, size: u64) -> RangeOutcome {
    let mut ranges = headers.get_all(RANGE).iter();
    let (Some(range), None) = (ranges.next(), ranges.next()) else {
        return RangeOutcome::Full;
    };
    if headers.get(IF_RANGE).is_some_and(|v| v.as_bytes() != etag.as_bytes()) {
        return RangeOutcome::Full;
    }
    match range.to_str() {
        Ok(range) => parse_range(range, size),
        Err(_) => RangeOutcome::Full,
    }
}

/// The descriptor's media type, or `application/octet-stream`: never empty (the reference sent
/// an empty one from its store).
fn content_type(media_type: &str) -> HeaderValue {
    if media_type.is_empty() {
        return HeaderValue::from_static(OCTET_STREAM);
    }
    HeaderValue::from_str(media_type).unwrap_or(HeaderValue::from_static(OCTET_STREAM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_range_must_match_the_digest_tag() {
        let tag = HeaderValue::from_static("\"sha256:abc\"");
        let mut h = HeaderMap::new();
        h.insert(RANGE, HeaderValue::from_static("bytes=1-2"));
        assert!(matches!(requested_range(&h, &tag, 10), RangeOutcome::Partial(_)));
        h.insert(IF_RANGE, HeaderValue::from_static("\"sha256:abc\""));
        assert!(matches!(requested_range(&h, &tag, 10), RangeOutcome::Partial(_)));
        h.insert(IF_RANGE, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(requested_range(&h, &tag, 10), RangeOutcome::Full);
        h.remove(IF_RANGE);
        h.append(RANGE, HeaderValue::from_static("bytes=3-4"));
        assert_eq!(requested_range(&h, &tag, 10), RangeOutcome::Full);
    }

    #[test]
    fn content_type_is_never_empty() {
        assert_eq!(content_type(""), OCTET_STREAM);
        assert_eq!(content_type("bad\nvalue"), OCTET_STREAM);
        assert_eq!(
            content_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
}
