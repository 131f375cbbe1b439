//! sandboxd as its clients see it: a real process on a random port, real HTTP.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod basics;
