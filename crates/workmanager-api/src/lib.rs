//! The WorkManager's edges: the gRPC service (`virtufin.WorkManager` plus
//! health and reflection), the HTTP router (health, metrics, the `/v1` REST
//! mirror, OpenAPI) and the CLI's client. Both servers are thin translations
//! into `workmanager_core::Manager` calls; errors are mapped to gRPC and HTTP
//! codes in one place (`error.rs`).
//!
//! Invariant: no lifecycle logic lives here; REST handlers call the same
//! gRPC service methods, so the two APIs cannot drift apart.

pub mod auth;
pub mod convert;
pub mod correlation;
mod dapr;
pub mod error;
pub mod forward;
pub mod grpc;
pub mod http;
pub mod jwt;
mod openapi;
pub mod server;
pub mod tls;
mod topics;

/// Generated protobuf, tonic and proto3-JSON code for the wire contract.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    pub mod io {
        pub mod cloudevents {
            pub mod v1 {
                tonic::include_proto!("io.cloudevents.v1");
                include!(concat!(env!("OUT_DIR"), "/io.cloudevents.v1.serde.rs"));
            }
        }
    }
    pub mod virtufin {
        tonic::include_proto!("virtufin");
        include!(concat!(env!("OUT_DIR"), "/virtufin.serde.rs"));
    }
    pub use virtufin::*;

    /// The encoded descriptor set of the contract (with imports), for reflection.
    pub const DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/workmanager_descriptor.bin"));
}
