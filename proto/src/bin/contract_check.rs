//! `slipway-contract-check [--golden PATH] [--bless]`: fails when the compiled `slipway.v1`
//! contract breaks the committed golden descriptor set. `--bless` writes the current contract as
//! the new golden set, and refuses to when the change is breaking.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use prost::Message;
use slipway_proto::contract;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("contract check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let mut golden = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/golden/slipway.v1.binpb"
    ));
    let mut bless = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--golden" => golden = args.next().context("--golden needs a path")?.into(),
            "--bless" => bless = true,
            "-h" | "--help" => {
                println!("usage: slipway-contract-check [--golden PATH] [--bless]");
                return Ok(ExitCode::SUCCESS);
            }
            other => anyhow::bail!("unknown argument `{other}`"),
        }
    }

    let current = contract::golden_form(&contract::decode_set(slipway_proto::FILE_DESCRIPTOR_SET)?);
    let report = match std::fs::read(&golden) {
        Ok(bytes) => contract::check(&contract::decode_set(&bytes)?, &current),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && bless => contract::Report::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", golden.display())),
    };

    for b in &report.breaking {
        println!("BREAKING  {b}");
    }
    for a in &report.additions {
        println!("added     {a}");
    }
    if !report.is_compatible() {
        println!(
            "{} breaking change(s) against {}: within v1 the contract only grows (docs/contract.md)",
            report.breaking.len(),
            golden.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if bless {
        std::fs::write(&golden, current.encode_to_vec())
            .with_context(|| format!("writing {}", golden.display()))?;
        println!("golden descriptor set written to {}", golden.display());
    } else if !report.additions.is_empty() {
        println!(
            "compatible; {} addition(s) not yet in the golden set: run with --bless and commit it",
            report.additions.len()
        );
    } else {
        println!("compatible: the contract matches the golden set");
    }
    Ok(ExitCode::SUCCESS)
}
