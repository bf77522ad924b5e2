//! Generated protobuf types and gRPC stubs of package `registryfacade` (proto/ at the repository
//! root). The method path `/registryfacade.SpecProvider/GetImageSpec` is the wire contract with
//! existing spec servers.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("registryfacade");
