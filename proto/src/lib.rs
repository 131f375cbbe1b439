//! The `slipway.v1` wire contract.
//!
//! Every message is a prost type with its canonical proto3 JSON form (pbjson: both `user_id` and
//! `userId` are accepted on input). Besides the types this crate holds the facts that belong to
//! the contract rather than to a service: the run event kinds and their publishers, the meter
//! catalogue, run ids, the wire codec and the contract check.
#![forbid(unsafe_code)]

pub mod codec;
pub mod contract;
pub mod events;
pub mod ids;
pub mod meters;
pub mod records;
pub mod validate;

/// Generated types of package `slipway.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/slipway.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/slipway.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of `slipway.v1` (with its imports), as compiled now.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/slipway_v1.binpb"));

pub use codec::{ContentType, DecodeError, WireMessage};
pub use events::EventKind;
pub use ids::{request_id_for_sequence, run_id_for};
