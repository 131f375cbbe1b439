//! sandboxd as its clients see it: a real process on a random port, real HTTP, real bubblewrap.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod api;
mod basics;
mod browser;
mod crash;
mod deploy;
mod edge;
mod events;
mod exec;
mod files;
mod hostile;
mod isolation;
mod races;
mod requests;
mod sandboxes;
mod storage;
mod watch;
