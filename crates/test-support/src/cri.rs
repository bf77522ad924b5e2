//! The kubelet's way of pulling an image: the CRI `runtime.v1.ImageService`, spoken over
//! containerd's unix socket with a client generated from proto/cri_image.proto (Debian ships no
//! crictl). Start containerd with its CRI plugin (`containerd::Options::cri_registry_config_path`).

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated CRI messages and client.
#[allow(missing_docs, clippy::all)]
pub mod runtime_v1 {
    tonic::include_proto!("runtime.v1");
}

use runtime_v1::image_service_client::ImageServiceClient;
use runtime_v1::{Image, ImageSpec, ImageStatusRequest, PullImageRequest};

/// How long one CRI call may take (a pull fetches and unpacks every layer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A CRI image-service client on containerd's socket, for synchronous tests.
pub struct CriImages {
    rt: tokio::runtime::Runtime,
    client: ImageServiceClient<Channel>,
}

impl CriImages {
    /// Connects to the gRPC socket of a containerd that runs the CRI plugin.
    pub fn connect(socket: &Path) -> anyhow::Result<CriImages> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            // The URI only names the :authority; every connection goes to the socket.
            Endpoint::from_static("http://containerd.invalid")
                .connect_timeout(Duration::from_secs(10))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                }))
                .await
        })?;
        Ok(CriImages { rt, client: ImageServiceClient::new(channel) })
    }

    /// `PullImage` of `image` without credentials, as the kubelet asks for a pod's image:
    /// the image reference containerd returns (the config digest), or the gRPC status it failed
    /// with (its message carries containerd's error text).
    pub fn pull(&mut self, image: &str) -> Result<String, tonic::Status> {
        let req = PullImageRequest { image: Some(spec(image)), auth: None };
        let client = &mut self.client;
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, client.pull_image(req)).await {
                Ok(r) => r.map(|r| r.into_inner().image_ref),
                Err(_) => {
                    Err(tonic::Status::deadline_exceeded(format!("PullImage {image}: no answer in {CALL_TIMEOUT:?}")))
                }
            }
        })
    }

    /// `ImageStatus` of `image`: `None` when the CRI image store does not have it.
    pub fn status(&mut self, image: &str) -> Result<Option<Image>, tonic::Status> {
        let req = ImageStatusRequest { image: Some(spec(image)), verbose: false };
        let client = &mut self.client;
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, client.image_status(req)).await {
                Ok(r) => r.map(|r| r.into_inner().image),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!("ImageStatus {image}: no answer"))),
            }
        })
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.to_string(), annotations: Default::default() }
}
