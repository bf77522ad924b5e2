//! The one request-failure edge: every failure of a request — routing, validation, limits,
//! backend — becomes (status, OCI code, message, detail) here, is logged here once, and leaves
//! as the distribution-spec envelope. Call sites only say *what* went wrong ([`Rejection`]).

use std::time::Duration;

use facade_oci::{ErrorCode, ErrorEnvelope};
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::auth::AuthFailure;
use crate::backend::{BackendError, ErrorKind};
use crate::body::Body;
use crate::headers;
use crate::router::RouteLabel;

/// Why a request is not answered with content.
#[derive(Debug)]
pub(crate) enum Rejection {
    Backend(BackendError),
    /// `requireAuth` is on and the request carries no valid credentials. Always 401, never
    /// 403: Docker clients only retry with credentials after a 401 with a challenge.
    Unauthorized {
        reason: AuthFailure,
    },
    /// The repository name breaks the grammar or the length limit.
    NameInvalid {
        reason: String,
    },
    /// A manifest reference that is not a valid tag (conformance wants 404 for
    /// `.INVALID_MANIFEST_NAME`).
    TagInvalid,
    /// A malformed digest in a manifest or blob URL.
    DigestInvalid {
        reason: String,
    },
    /// A name without a workspace id: no provider can know it.
    NoWorkspace,
    /// The manifest's media type is outside the client's `Accept`.
    NotAcceptable {
        accepted: Vec<String>,
        offered: String,
    },
    /// The backend's bytes do not hash to the digest in the URL.
    ManifestDigestMismatch {
        actual: String,
    },
    /// The backend's bytes do not hash to the digest it claims (a backend bug).
    BackendDigestWrong {
        claimed: String,
        actual: String,
    },
    /// The backend gave a media type or URL that cannot be a header value.
    BadHeaderValue {
        what: &'static str,
    },
    /// Manifest PUT: 400, never 405 (the conformance error-code test fails on 405).
    ManifestPut,
    /// Uploads, deletes and anything but GET/HEAD on a content route.
    MethodNotAllowed,
    /// A path that no route matches.
    RouteNotFound,
    /// A Range that starts past the end of the blob.
    RangeNotSatisfiable {
        size: u64,
    },
    /// The backend did not answer within the response-header budget.
    HeaderTimeout {
        after: Duration,
    },
    /// The request URL (path and query) is longer than `max_url_bytes`. No repository name
    /// or reference is that long, so it is treated as an over-long name.
    UrlTooLong {
        len: usize,
        max: usize,
    },
    /// The client address already has `max_requests_per_client` requests in flight.
    ClientBusy {
        limit: usize,
    },
}

impl From<BackendError> for Rejection {
    fn from(e: BackendError) -> Self {
        Rejection::Backend(e)
    }
}

/// What the request was, for logs.
#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    pub(crate) route: RouteLabel,
    pub(crate) method: Method,
    /// Clipped: names can be 10 KB of attacker text.
    pub(crate) name: String,
    pub(crate) reference: String,
}

/// How a rejection goes on the wire. `code` is `None` only for 416 (no spec code exists).
#[derive(Debug, PartialEq)]
struct Mapped {
    status: StatusCode,
    code: Option<ErrorCode>,
    message: String,
    detail: Value,
    /// Internal text that is logged but never sent.
    log_only: Option<String>,
}

fn mapped(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Mapped {
    Mapped { status, code: Some(code), message: message.into(), detail: Value::Null, log_only: None }
}

impl Mapped {
    fn with_detail(self, detail: Value) -> Mapped {
        Mapped { detail, ..self }
    }

    fn with_log_only(self, text: String) -> Mapped {
        Mapped { log_only: Some(text), ..self }
    }
}

/// Every internal failure looks the same to clients: raw internal text never reaches them,
/// operators find it in the log line.
fn internal(log_only: String) -> Mapped {
    mapped(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, "internal error").with_log_only(log_only)
}

fn map_backend(e: &BackendError) -> Mapped {
    use ErrorKind as K;
    let (status, code) = match e.kind {
        K::ManifestUnknown => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
        K::BlobUnknown => (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown),
        K::NameUnknown => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
        K::NameInvalid => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
        K::DigestInvalid => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
        K::ManifestInvalid => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
        K::Unauthorized => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
        K::Denied => (StatusCode::FORBIDDEN, ErrorCode::Denied),
        K::RateLimited => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
        K::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
        K::Internal => return internal(format!("{}; detail: {}", e.message, e.detail)),
    };
    mapped(status, code, e.message.clone()).with_detail(e.detail.clone())
}

/// The one table of request failures. Exhaustive on purpose: a new [`Rejection`] does not
/// compile until it has its status here.
fn map(rejection: &Rejection, route: RouteLabel) -> Mapped {
    use Rejection as R;
    match rejection {
        R::Backend(e) => map_backend(e),
        R::Unauthorized { reason } => map_auth(*reason),
        R::NameInvalid { reason } => invalid(ErrorCode::NameInvalid, "invalid repository name", reason),
        R::TagInvalid => mapped(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, "invalid tag"),
        R::DigestInvalid { reason } => invalid(ErrorCode::DigestInvalid, "invalid digest", reason),
        R::NoWorkspace => map_no_workspace(route),
        R::NotAcceptable { accepted, offered } => map_not_acceptable(accepted, offered),
        R::ManifestDigestMismatch { actual } => {
            mapped(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, "manifest unknown")
                .with_log_only(format!("backend bytes hash to {actual}"))
        }
        R::BackendDigestWrong { claimed, actual } => {
            internal(format!("backend claims {claimed}, bytes hash to {actual}"))
        }
        R::BadHeaderValue { what } => internal(format!("backend {what} is not a valid header value")),
        R::ManifestPut => mapped(
            StatusCode::BAD_REQUEST,
            ErrorCode::Unsupported,
            "this registry is pull-only: manifests cannot be pushed",
        ),
        R::MethodNotAllowed => mapped(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "this registry is pull-only: only GET and HEAD are allowed",
        ),
        R::RouteNotFound => mapped(StatusCode::NOT_FOUND, ErrorCode::Unsupported, "no such endpoint"),
        R::RangeNotSatisfiable { size } => map_range_not_satisfiable(*size),
        R::HeaderTimeout { after } => mapped(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the image could not be prepared in time, retry",
        )
        .with_detail(json!({ "timeout_seconds": after.as_secs_f64() })),
        R::UrlTooLong { len, max } => {
            mapped(StatusCode::URI_TOO_LONG, ErrorCode::NameInvalid, format!("request URL is longer than {max} bytes"))
                .with_detail(json!({ "length": len, "max": max }))
        }
        R::ClientBusy { limit } => mapped(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyRequests,
            format!("too many concurrent requests from this address (limit {limit})"),
        )
        .with_detail(json!({ "limit": limit })),
    }
}

fn map_auth(reason: AuthFailure) -> Mapped {
    let message = match reason {
        AuthFailure::Missing => "authentication required",
        AuthFailure::Malformed => "malformed Authorization header: Basic credentials expected",
        // One message for both: the answer must not tell which user names exist.
        AuthFailure::UnknownUser | AuthFailure::WrongPassword => "invalid username or password",
        AuthFailure::Unavailable => "credentials cannot be checked now",
        // `App::authorize` answers these 429 itself; kept here so the match stays total.
        AuthFailure::Throttled => "too many failed credential checks; retry later",
    };
    mapped(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
}

/// A malformed name or digest: 400, with the parser's reason as detail.
fn invalid(code: ErrorCode, message: &'static str, reason: &str) -> Mapped {
    mapped(StatusCode::BAD_REQUEST, code, message).with_detail(json!({ "reason": reason }))
}

/// The node-labeler probes `/v2/remote/not-a-valid-image/manifests/latest` and treats 404 as
/// ready; a bare name gets the same answer (README, "What it does").
fn map_no_workspace(route: RouteLabel) -> Mapped {
    let code = if route == RouteLabel::Blob { ErrorCode::BlobUnknown } else { ErrorCode::ManifestUnknown };
    mapped(StatusCode::NOT_FOUND, code, "no workspace in repository name")
}

fn map_not_acceptable(accepted: &[String], offered: &str) -> Mapped {
    mapped(
        StatusCode::NOT_FOUND,
        ErrorCode::ManifestUnknown,
        format!("manifest is {offered}, which the request does not accept (accepted: {})", accepted.join(", ")),
    )
    .with_detail(json!({ "accepted": accepted, "available": offered }))
}

/// 416 has no code in the distribution spec: the answer carries no envelope.
fn map_range_not_satisfiable(size: u64) -> Mapped {
    Mapped {
        status: StatusCode::RANGE_NOT_SATISFIABLE,
        code: None,
        message: format!("range not satisfiable for a blob of {size} bytes"),
        detail: Value::Null,
        log_only: None,
    }
}

/// Turns a rejection into its response and logs it: warn for 5xx, debug for 4xx, error for
/// the manifest-digest safety net (it means a backend broke determinism).
pub(crate) fn respond(rejection: Rejection, ctx: &RequestContext, default_retry_after: Duration) -> Response<Body> {
    let m = map(&rejection, ctx.route);
    log(&m, &rejection, ctx);

    let body = match m.code {
        Some(code) => ErrorEnvelope::single(code, m.message, m.detail).to_bytes(),
        None => Vec::new(),
    };
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = m.status;
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if !body.is_empty() {
        h.insert(CONTENT_TYPE, HeaderValue::from_static(headers::JSON));
    }
    match &rejection {
        Rejection::Unauthorized { .. } => {
            h.insert(WWW_AUTHENTICATE, HeaderValue::from_static(headers::BASIC_CHALLENGE));
        }
        Rejection::MethodNotAllowed => {
            h.insert(ALLOW, HeaderValue::from_static(headers::ALLOWED_METHODS));
        }
        Rejection::ClientBusy { .. } => {
            // A slot frees as soon as one of the client's own transfers ends: retry soon.
            h.insert(RETRY_AFTER, HeaderValue::from(CLIENT_BUSY_RETRY_AFTER_SECS));
        }
        Rejection::RangeNotSatisfiable { size } => {
            h.insert(CONTENT_RANGE, header_value(format!("bytes */{size}")));
            h.insert(http::header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        Rejection::Backend(e) => match e.kind {
            ErrorKind::Unauthorized => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static(headers::BASIC_CHALLENGE));
            }
            ErrorKind::RateLimited => {
                let wait = e.retry_after.unwrap_or(default_retry_after);
                h.insert(RETRY_AFTER, HeaderValue::from(retry_seconds(wait)));
            }
            ErrorKind::Unavailable => {
                if let Some(wait) = e.retry_after {
                    h.insert(RETRY_AFTER, HeaderValue::from(retry_seconds(wait)));
                }
            }
            _ => {}
        },
        _ => {}
    }
    *resp.body_mut() = Body::full(body);
    resp
}

/// `Retry-After` of a request refused by the per-client limit.
const CLIENT_BUSY_RETRY_AFTER_SECS: u64 = 1;

/// Whole seconds, rounded up, at least 1: `Retry-After: 0` invites a hot retry loop.
fn retry_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

fn header_value(s: String) -> HeaderValue {
    // Only ASCII digits, '*', '/' and spaces are formatted into this value.
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("bytes */0"))
}

fn log(m: &Mapped, rejection: &Rejection, ctx: &RequestContext) {
    let status = m.status.as_u16();
    let code = m.code.map_or("", ErrorCode::as_str);
    let internal = m.log_only.as_deref().unwrap_or("");
    let route = ctx.route.as_str();
    let method = ctx.method.as_str();
    let (name, reference) = (ctx.name.as_str(), ctx.reference.as_str());
    if matches!(rejection, Rejection::ManifestDigestMismatch { .. }) {
        tracing::error!(
            route,
            method,
            name,
            reference,
            status,
            code,
            internal,
            "served manifest does not hash to the requested digest"
        );
    } else if m.status.is_server_error() {
        tracing::warn!(route, method, name, reference, status, code, message = %m.message, internal, "request failed");
    } else {
        tracing::debug!(route, method, name, reference, status, code, message = %m.message, "request rejected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn ctx(route: RouteLabel) -> RequestContext {
        RequestContext { route, method: Method::GET, name: "remote/x".into(), reference: "latest".into() }
    }

    #[test]
    fn backend_kinds_map_to_spec_statuses_and_codes() {
        use ErrorKind as K;
        let table = [
            (K::ManifestUnknown, 404, "MANIFEST_UNKNOWN"),
            (K::BlobUnknown, 404, "BLOB_UNKNOWN"),
            (K::NameUnknown, 404, "NAME_UNKNOWN"),
            (K::NameInvalid, 400, "NAME_INVALID"),
            (K::DigestInvalid, 400, "DIGEST_INVALID"),
            (K::ManifestInvalid, 400, "MANIFEST_INVALID"),
            (K::Unauthorized, 401, "UNAUTHORIZED"),
            (K::Denied, 403, "DENIED"),
            (K::RateLimited, 429, "TOOMANYREQUESTS"),
            (K::Unavailable, 503, "UNAVAILABLE"),
            (K::Internal, 500, "UNKNOWN"),
        ];
        for (kind, status, code) in table {
            let m = map_backend(&BackendError::new(kind, "m"));
            assert_eq!(m.status.as_u16(), status, "{kind:?}");
            assert_eq!(m.code.map(ErrorCode::as_str), Some(code), "{kind:?}");
        }
    }

    #[tokio::test]
    async fn internal_text_never_leaks() {
        let e = BackendError::internal("redis at 10.0.0.1:6379 password=hunter2").with_detail(json!({"secret": "x"}));
        let resp = respond(Rejection::Backend(e), &ctx(RouteLabel::Blob), Duration::from_secs(1));
        assert_eq!(resp.status(), 500);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(!text.contains("hunter2") && !text.contains("secret"), "{text}");
        assert!(text.contains("\"UNKNOWN\""));
    }

    #[tokio::test]
    async fn rate_limit_and_auth_headers() {
        let e = BackendError::new(ErrorKind::RateLimited, "slow down")
            .with_retry_after(Duration::from_millis(1500))
            .with_detail(json!({"host": "registry-1.docker.io", "status": 429}));
        let resp = respond(Rejection::Backend(e), &ctx(RouteLabel::Manifest), Duration::from_secs(7));
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
        assert_eq!(v["errors"][0]["detail"]["host"], "registry-1.docker.io");

        let e = BackendError::new(ErrorKind::RateLimited, "slow down");
        let resp = respond(Rejection::Backend(e), &ctx(RouteLabel::Manifest), Duration::from_secs(7));
        assert_eq!(resp.headers()[RETRY_AFTER], "7");

        let e = BackendError::new(ErrorKind::Unauthorized, "who");
        let resp = respond(Rejection::Backend(e), &ctx(RouteLabel::Base), Duration::from_secs(1));
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()[WWW_AUTHENTICATE], "Basic realm=\"registry-facade\"");
    }

    #[test]
    fn routing_rejections() {
        let cases = [
            (Rejection::TagInvalid, RouteLabel::Manifest, 404, Some("MANIFEST_UNKNOWN")),
            (Rejection::Unauthorized { reason: AuthFailure::Missing }, RouteLabel::Base, 401, Some("UNAUTHORIZED")),
            (
                Rejection::Unauthorized { reason: AuthFailure::WrongPassword },
                RouteLabel::Blob,
                401,
                Some("UNAUTHORIZED"),
            ),
            (Rejection::NoWorkspace, RouteLabel::Manifest, 404, Some("MANIFEST_UNKNOWN")),
            (Rejection::NoWorkspace, RouteLabel::Blob, 404, Some("BLOB_UNKNOWN")),
            (Rejection::ManifestPut, RouteLabel::Manifest, 400, Some("UNSUPPORTED")),
            (Rejection::MethodNotAllowed, RouteLabel::Blob, 405, Some("UNSUPPORTED")),
            (Rejection::RouteNotFound, RouteLabel::Other, 404, Some("UNSUPPORTED")),
            (Rejection::RangeNotSatisfiable { size: 3 }, RouteLabel::Blob, 416, None),
            (Rejection::UrlTooLong { len: 9000, max: 8192 }, RouteLabel::Manifest, 414, Some("NAME_INVALID")),
            (Rejection::ClientBusy { limit: 4 }, RouteLabel::Blob, 429, Some("TOOMANYREQUESTS")),
            (
                Rejection::ManifestDigestMismatch { actual: "sha256:x".into() },
                RouteLabel::Manifest,
                404,
                Some("MANIFEST_UNKNOWN"),
            ),
        ];
        for (rejection, route, status, code) in cases {
            let m = map(&rejection, route);
            assert_eq!(m.status.as_u16(), status, "{rejection:?}");
            assert_eq!(m.code.map(ErrorCode::as_str), code, "{rejection:?}");
        }
    }

    /// Messages and details are part of the answer clients and operators see: pinned here so
    /// that a reshuffle of the table cannot change one unnoticed.
    #[test]
    fn messages_and_details_are_pinned() {
        let cases = [
            (Rejection::Unauthorized { reason: AuthFailure::Missing }, "authentication required", Value::Null),
            (
                Rejection::Unauthorized { reason: AuthFailure::Malformed },
                "malformed Authorization header: Basic credentials expected",
                Value::Null,
            ),
            (Rejection::Unauthorized { reason: AuthFailure::UnknownUser }, "invalid username or password", Value::Null),
            (
                Rejection::Unauthorized { reason: AuthFailure::Unavailable },
                "credentials cannot be checked now",
                Value::Null,
            ),
            (Rejection::NameInvalid { reason: "r".into() }, "invalid repository name", json!({ "reason": "r" })),
            (Rejection::TagInvalid, "invalid tag", Value::Null),
            (Rejection::DigestInvalid { reason: "d".into() }, "invalid digest", json!({ "reason": "d" })),
            (Rejection::NoWorkspace, "no workspace in repository name", Value::Null),
            (
                Rejection::NotAcceptable { accepted: vec!["a".into(), "b".into()], offered: "c".into() },
                "manifest is c, which the request does not accept (accepted: a, b)",
                json!({ "accepted": ["a", "b"], "available": "c" }),
            ),
            (Rejection::ManifestDigestMismatch { actual: "sha256:x".into() }, "manifest unknown", Value::Null),
            (
                Rejection::BackendDigestWrong { claimed: "sha256:a".into(), actual: "sha256:b".into() },
                "internal error",
                Value::Null,
            ),
            (Rejection::BadHeaderValue { what: "redirect URL" }, "internal error", Value::Null),
            (Rejection::ManifestPut, "this registry is pull-only: manifests cannot be pushed", Value::Null),
            (Rejection::MethodNotAllowed, "this registry is pull-only: only GET and HEAD are allowed", Value::Null),
            (Rejection::RouteNotFound, "no such endpoint", Value::Null),
            (Rejection::RangeNotSatisfiable { size: 3 }, "range not satisfiable for a blob of 3 bytes", Value::Null),
            (
                Rejection::HeaderTimeout { after: Duration::from_millis(1500) },
                "the image could not be prepared in time, retry",
                json!({ "timeout_seconds": 1.5 }),
            ),
            (
                Rejection::UrlTooLong { len: 9000, max: 8192 },
                "request URL is longer than 8192 bytes",
                json!({ "length": 9000, "max": 8192 }),
            ),
            (
                Rejection::ClientBusy { limit: 4 },
                "too many concurrent requests from this address (limit 4)",
                json!({ "limit": 4 }),
            ),
        ];
        for (rejection, message, detail) in cases {
            let m = map(&rejection, RouteLabel::Manifest);
            assert_eq!((m.message.as_str(), &m.detail), (message, &detail), "{rejection:?}");
        }
        let m = map(
            &Rejection::BackendDigestWrong { claimed: "sha256:a".into(), actual: "sha256:b".into() },
            RouteLabel::Blob,
        );
        assert_eq!(m.log_only.as_deref(), Some("backend claims sha256:a, bytes hash to sha256:b"));
        let m = map(&Rejection::ManifestDigestMismatch { actual: "sha256:x".into() }, RouteLabel::Manifest);
        assert_eq!(m.log_only.as_deref(), Some("backend bytes hash to sha256:x"));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_seconds(Duration::ZERO), 1);
        assert_eq!(retry_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_seconds(Duration::from_secs(30)), 30);
        assert_eq!(retry_seconds(Duration::from_millis(30_001)), 31);
    }
}
