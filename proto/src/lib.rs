//! Venom's wire protocol (`venom.v1`): the generated prost messages and tonic
//! services, plus the encoded descriptor set that gRPC reflection serves.
//!
//! This is the only crate that knows about protobuf code generation; every other
//! crate converts between these wire types and its own domain types at its edge.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("venom.v1");
}

/// Encoded `FileDescriptorSet` of `venom.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/venom_descriptor.bin"));

pub use v1::*;
