//! Path → route. One function, parsed from the right: names contain `/`, so the last two
//! segments (`manifests|blobs` and the reference, or `tags/list`) are fixed and everything
//! before is the name.

/// A matched route; the pieces are raw (not percent-decoded) path text, validated later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/tags/list`
    Tags { name: &'a str },
    /// `/v2/<name>/blobs/uploads/[<session>]`: push only, always refused.
    Upload,
    /// Anything else.
    NotFound,
}

/// Bounded metric label of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RouteLabel {
    Base,
    Manifest,
    Blob,
    Tags,
    Other,
}

impl RouteLabel {
    pub(crate) const ALL: [RouteLabel; 5] =
        [RouteLabel::Base, RouteLabel::Manifest, RouteLabel::Blob, RouteLabel::Tags, RouteLabel::Other];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Base => "base",
            RouteLabel::Manifest => "manifest",
            RouteLabel::Blob => "blob",
            RouteLabel::Tags => "tags",
            RouteLabel::Other => "other",
        }
    }
}

impl Route<'_> {
    pub(crate) fn label(&self) -> RouteLabel {
        match self {
            Route::Base => RouteLabel::Base,
            Route::Manifest { .. } => RouteLabel::Manifest,
            Route::Blob { .. } | Route::Upload => RouteLabel::Blob,
            Route::Tags { .. } => RouteLabel::Tags,
            Route::NotFound => RouteLabel::Other,
        }
    }
}

/// Normalizes a configured prefix to `""` or `/a/b` (leading slash, no trailing slash).
pub(crate) fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim().trim_matches('/');
    if trimmed.is_empty() { String::new() } else { format!("/{trimmed}") }
}

/// Matches `path` (no query string) under a normalized `prefix`.
pub(crate) fn parse<'a>(prefix: &str, path: &'a str) -> Route<'a> {
    let Some(rest) = path.strip_prefix(prefix).and_then(|p| p.strip_prefix("/v2")) else {
        return Route::NotFound;
    };
    let rest = match rest {
        "" | "/" => return Route::Base,
        r => match r.strip_prefix('/') {
            Some(r) => r,
            None => return Route::NotFound,
        },
    };
    let Some((head, last)) = rest.rsplit_once('/') else {
        return Route::NotFound;
    };
    let Some((name, kind)) = head.rsplit_once('/') else {
        return Route::NotFound;
    };
    match kind {
        "manifests" => Route::Manifest { name, reference: last },
        "blobs" if last == "uploads" => Route::Upload,
        "blobs" => Route::Blob { name, digest: last },
        "tags" if last == "list" => Route::Tags { name },
        // `<name>/blobs/uploads/` (POST) and `<name>/blobs/uploads/<session>` (PATCH, PUT)
        "uploads" if name.ends_with("/blobs") || name == "blobs" => Route::Upload,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_from_the_right() {
        let cases: &[(&str, &str, Route<'_>)] = &[
            ("", "/v2/", Route::Base),
            ("", "/v2", Route::Base),
            ("", "/v2/remote/abc/manifests/latest", Route::Manifest { name: "remote/abc", reference: "latest" }),
            ("", "/v2/remote/a/b/c/manifests/latest", Route::Manifest { name: "remote/a/b/c", reference: "latest" }),
            ("", "/v2/remote/abc/blobs/sha256:00", Route::Blob { name: "remote/abc", digest: "sha256:00" }),
            ("", "/v2/a/manifests/x/blobs/d", Route::Blob { name: "a/manifests/x", digest: "d" }),
            ("", "/v2/a/blobs/uploads/manifests/t", Route::Manifest { name: "a/blobs/uploads", reference: "t" }),
            ("", "/v2/remote/abc/manifests/", Route::Manifest { name: "remote/abc", reference: "" }),
            ("", "/v2/abc/manifests/latest", Route::Manifest { name: "abc", reference: "latest" }),
            ("", "/v2//manifests/latest", Route::Manifest { name: "", reference: "latest" }),
            ("", "/v2/remote/abc/blobs/uploads/", Route::Upload),
            ("", "/v2/remote/abc/blobs/uploads", Route::Upload),
            ("", "/v2/remote/abc/blobs/uploads/1234-abcd", Route::Upload),
            ("", "/v2/remote/abc/tags/list", Route::Tags { name: "remote/abc" }),
            ("", "/v2/remote/a/b/tags/list", Route::Tags { name: "remote/a/b" }),
            ("", "/v2/remote/abc/tags/other", Route::NotFound),
            ("", "/v2/tags/list", Route::NotFound),
            ("", "/v2/a/tags/list/manifests/x", Route::Manifest { name: "a/tags/list", reference: "x" }),
            ("/registry", "/registry/v2/fixed/demo/tags/list", Route::Tags { name: "fixed/demo" }),
            ("", "/v2/remote/abc/referrers/sha256:00", Route::NotFound),
            ("", "/v2/manifests/latest", Route::NotFound),
            ("", "/v2/remote", Route::NotFound),
            ("", "/v2x/", Route::NotFound),
            ("", "/v3/", Route::NotFound),
            ("", "/", Route::NotFound),
            ("", "", Route::NotFound),
            ("", "/registry/v2/", Route::NotFound),
            ("/registry", "/registry/v2/", Route::Base),
            (
                "/registry",
                "/registry/v2/remote/x/manifests/latest",
                Route::Manifest { name: "remote/x", reference: "latest" },
            ),
            ("/registry", "/v2/", Route::NotFound),
            ("/registry", "/registryv2/", Route::NotFound),
        ];
        for (prefix, path, want) in cases {
            assert_eq!(parse(prefix, path), *want, "{prefix:?} {path:?}");
        }
    }

    #[test]
    fn normalizes_prefixes() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("registry"), "/registry");
        assert_eq!(normalize_prefix("/registry/"), "/registry");
        assert_eq!(normalize_prefix("/a/b"), "/a/b");
    }

    #[test]
    fn long_paths_do_not_panic() {
        let name = "a/".repeat(5_000);
        let path = format!("/v2/{name}x/manifests/latest");
        assert!(matches!(parse("", &path), Route::Manifest { .. }));
    }
}
