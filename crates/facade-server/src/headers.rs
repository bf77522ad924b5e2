//! Header names and fixed values this crate sends.

use http::HeaderName;

/// Sent on every response; clients probe `/v2/` for it.
pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
/// Value of [`API_VERSION`].
pub const API_VERSION_VALUE: &str = "registry/2.0";
/// The digest of the served manifest or the requested blob; containerd resolves tags from it.
pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// The methods a pull-only registry allows on the content routes.
pub const ALLOWED_METHODS: &str = "GET, HEAD";
/// Challenge sent with 401.
pub const BASIC_CHALLENGE: &str = "Basic realm=\"registry-facade\"";
/// Content type of error bodies and of `/v2/`.
pub const JSON: &str = "application/json";
