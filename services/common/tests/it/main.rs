//! Integration tests of the shared kit, against real nats-server processes (one per test).
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod auth;
mod blobs;
mod config;
mod helpers;
mod keys;
mod lease;
mod partition;
mod publish;
mod records;
mod rpc;
mod setup;
mod shutdown;
mod subjects;
mod worker;
