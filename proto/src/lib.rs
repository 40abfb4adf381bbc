//! Venom's wire protocol (`venom.v1`): the generated prost messages and tonic
//! services, plus the encoded descriptor set that gRPC reflection serves.
//!
//! This is the only crate that knows about protobuf code generation. [`convert`] gives the
//! shared vocabulary (`venom-core`) its wire form and back; every other crate converts
//! between these wire types and its own domain types in one module (`convert.rs`) of its
//! own. [`leader`] builds and reads the not-leader refusal.

pub mod convert;
pub mod leader;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("venom.v1");
}

/// Encoded `FileDescriptorSet` of `venom.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/venom_descriptor.bin"));

pub use v1::*;
