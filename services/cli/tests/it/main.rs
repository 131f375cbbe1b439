//! Tests of the `slipway` binary as a user runs it: a real process against a real nats-server.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod auth;
mod setup;
