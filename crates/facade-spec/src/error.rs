//! Spec provider failures, classified so the HTTP edge can answer and callers can decide whether
//! to retry.

/// Why a spec could not be had. `Clone`, so one answer can be cached and handed to many callers.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// The provider name in the URL is not configured.
    #[error("no spec provider named {provider:?}")]
    UnknownProvider {
        /// The name asked for.
        provider: String,
    },
    /// The provider does not know this workspace id (gRPC NOT_FOUND, missing key in the file).
    #[error("spec provider {provider:?} has no workspace {id:?}")]
    NotFound {
        /// Provider name.
        provider: String,
        /// Workspace id.
        id: String,
    },
    /// The provider answered with a spec that cannot describe an image.
    #[error("spec for workspace {id:?} is invalid: {reason}")]
    InvalidSpec {
        /// Workspace id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The provider cannot be reached or did not answer in time; worth retrying.
    #[error("spec provider {provider:?} unavailable: {reason}")]
    Unavailable {
        /// Provider name.
        provider: String,
        /// Transport or status detail (no credentials).
        reason: String,
    },
    /// The spec file or provider configuration is unusable.
    #[error("spec provider configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether asking again (later) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

impl Error {
    /// Classifies a gRPC failure of `GetImageSpec` for workspace `id` at provider `provider`
    /// (`endpoint` names the server for logs). The one place that decides what a status code
    /// means to the facade; callers never match on codes themselves.
    pub fn from_status(provider: &str, endpoint: &str, id: &str, status: &tonic::Status) -> Error {
        use tonic::Code;
        let reason = || {
            // Transport failures carry a bare "transport error"; the cause (refused, TLS alert)
            // is in the source chain.
            match std::error::Error::source(status) {
                Some(cause) => format!("{endpoint}: {:?}: {}: {}", status.code(), status.message(), error_chain(cause)),
                None => format!("{endpoint}: {:?}: {}", status.code(), status.message()),
            }
        };
        match status.code() {
            Code::NotFound => Error::NotFound { provider: provider.to_string(), id: id.to_string() },
            // A spec server that finds the id malformed has no such workspace either; answering
            // 404 keeps the operators' readiness probe (`/v2/remote/not-a-valid-image/...` → 404)
            // working against servers that validate ids.
            Code::InvalidArgument => Error::NotFound { provider: provider.to_string(), id: id.to_string() },
            // The provider refuses who we are or does not speak the service: asking again will not
            // help, an operator has to fix certificates or the address.
            Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented => {
                Error::Config(format!("spec provider {provider:?} refused GetImageSpec: {}", reason()))
            }
            // Everything else is the provider (or the path to it) failing now: transport errors
            // arrive as UNAVAILABLE or UNKNOWN, overload as RESOURCE_EXHAUSTED, a workspace still
            // starting may be FAILED_PRECONDITION. They may pass, so they are `Unavailable`: the
            // spec cache serves an earlier answer and the edge answers 503, never 404.
            Code::Ok
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Internal
            | Code::DataLoss => Error::Unavailable { provider: provider.to_string(), reason: reason() },
        }
    }
}

/// An error with its causes, `: `-separated (tonic's transport errors say "transport error" at
/// the top; what happened is further down).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn map(code: Code) -> Error {
        Error::from_status("remote", "127.0.0.1:1", "ws", &Status::new(code, "msg"))
    }

    #[test]
    fn not_found_and_invalid_argument_mean_no_such_workspace() {
        for code in [Code::NotFound, Code::InvalidArgument] {
            assert!(
                matches!(map(code), Error::NotFound { ref provider, ref id } if provider == "remote" && id == "ws"),
                "{code:?}"
            );
            assert!(!map(code).is_retryable());
        }
    }

    #[test]
    fn refusals_are_configuration_errors() {
        for code in [Code::Unauthenticated, Code::PermissionDenied, Code::Unimplemented] {
            let e = map(code);
            assert!(matches!(e, Error::Config(_)), "{code:?}: {e:?}");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        }
    }

    #[test]
    fn transient_codes_are_unavailable() {
        for code in [
            Code::Ok,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::AlreadyExists,
            Code::Internal,
            Code::DataLoss,
        ] {
            let e = map(code);
            assert!(matches!(e, Error::Unavailable { .. }), "{code:?}: {e:?}");
            assert!(e.is_retryable());
            assert!(e.to_string().contains("msg"), "{e}");
        }
    }
}
