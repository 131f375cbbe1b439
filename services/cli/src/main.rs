//! `slipway`: the command line. Today: `setup` (streams, consumers and buckets), `auth`
//! (generated NATS authorization and per-component nkeys) and `config`. The run verbs (`up`,
//! `run`, `feedback`, ...) arrive with the services they drive.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = slipway_cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slipway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(slipway_cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("slipway: {e:#}");
            ExitCode::FAILURE
        }
    }
}
