//! What keeps a sandbox in its place: bubblewrap for files and processes, a network namespace
//! per sandbox, and cgroups for limits, accounting and freezing.

pub mod cgroup;
pub mod net;
pub mod seccomp;
pub mod view;
