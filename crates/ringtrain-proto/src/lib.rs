//! Wire types of ringtrain and their validated domain twins.
//!
//! `build.rs` compiles `proto/ringtrain/v1/*.proto` with `protox` (no system
//! `protoc`) into a private module. Nothing generated leaves this crate:
//! callers see the domain types of [`collective`], built from wire messages by
//! `TryFrom` exactly once, on receipt, and the gRPC plumbing of [`grpc`], which
//! speaks only domain types.
//!
//! **Architecture invariant:** wire types do not leak past this crate, and every
//! inbound message is validated here before anyone else looks at it.

mod wire {
    #![allow(
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic,
        unreachable_pub,
        reason = "generated code"
    )]
    include!(concat!(env!("OUT_DIR"), "/ringtrain.v1.rs"));
}

mod codec;
pub mod collective;
pub mod coordinator;
pub mod decode;
pub mod grpc;
pub mod tls;
