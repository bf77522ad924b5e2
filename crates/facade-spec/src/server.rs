//! A spec server for development and tests: `registryfacade.SpecProvider` over the same JSON
//! file the `fixed` provider reads, in plaintext, TLS or mutual TLS.
//!
//! Not meant to replace the platform's spec server; it exists so the `remote` provider can be
//! run and tested against a real gRPC peer.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, error_chain};
use crate::fixed::FixedSpecProvider;
use crate::grpc::{check_certificates, check_key};
use crate::proto::spec_provider_server::{SpecProvider as SpecService, SpecProviderServer};
use crate::proto::{GetImageSpecRequest, GetImageSpecResponse};
use crate::provider::SpecProvider as _;

/// Answers `GetImageSpec` from a [`FixedSpecProvider`]: NOT_FOUND for an unknown id.
#[derive(Clone, Debug)]
pub struct SpecServer {
    specs: FixedSpecProvider,
}

impl SpecServer {
    /// A server over `specs`.
    pub fn new(specs: FixedSpecProvider) -> Self {
        SpecServer { specs }
    }

    /// The tonic service, to add to a `Server`.
    pub fn into_service(self) -> SpecProviderServer<SpecServer> {
        SpecProviderServer::new(self)
    }
}

#[tonic::async_trait]
impl SpecService for SpecServer {
    async fn get_image_spec(
        &self,
        request: Request<GetImageSpecRequest>,
    ) -> std::result::Result<Response<GetImageSpecResponse>, Status> {
        let id = request.into_inner().id;
        match self.specs.get_spec(&id).await {
            Ok(spec) => {
                tracing::debug!(id, "serving spec");
                Ok(Response::new(GetImageSpecResponse { spec: Some(spec.to_proto()) }))
            }
            Err(Error::NotFound { .. }) => {
                tracing::debug!(id, "no such workspace");
                Err(Status::not_found(format!("no workspace {id:?}")))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

/// Server TLS: our certificate and key, and for mutual TLS the CA client certificates must be
/// signed by (clients without one are then refused).
#[derive(Clone)]
pub struct ServerTls {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
    /// PEM CA bundle for client certificates; `None` accepts any client.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

/// Serves `specs` on `listener` until `shutdown` completes; then stops accepting and lets the
/// calls in flight finish. TLS problems (unreadable PEM) are `Error::Config`, before serving.
pub async fn serve(
    listener: TcpListener,
    specs: FixedSpecProvider,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut builder = Server::builder();
    if let Some(t) = tls {
        check_certificates("spec server TLS certificate", &t.cert_pem)?;
        check_key("spec server TLS key", &t.key_pem)?;
        if let Some(ca) = &t.client_ca_pem {
            check_certificates("spec server client CA", ca)?;
        }
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&t.cert_pem, &t.key_pem));
        if let Some(ca) = &t.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| Error::Config(format!("spec server TLS settings: {}", error_chain(&e))))?;
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .add_service(SpecServer::new(specs).into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Unavailable { provider: "spec-server".into(), reason: error_chain(&e) })
}
