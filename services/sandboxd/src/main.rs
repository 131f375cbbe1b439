//! `slipway-sandboxd`: a MIOSA-compatible sandbox host for one machine.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = slipway_sandboxd::Args::parse();
    slipway_sandboxd::main(args)
}
