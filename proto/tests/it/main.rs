//! The contract's own tests: codec round trips, run ids, event kinds, meters, validation and the
//! contract check.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod codec;
mod contract;
mod kinds;
mod validate;
