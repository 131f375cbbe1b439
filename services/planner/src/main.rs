//! The `slipway-planner` binary: everything is in the library and the shared service kit.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    slipway_common::cli::service_main(slipway_common::Service::Planner, slipway_planner::serve)
}
