//! The executor's MIOSA client against a local server that plays MIOSA (its documented shapes
//! and errors: MIOSA's cloud cannot be reached from here) and against a real sandboxd, directly
//! and through the executor's NATS service.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod fake;
mod faults;
mod harness;
mod hostile;
mod operations;
mod platform;
mod relay;
mod sandboxd;
mod service;
mod usage;
mod wire;
