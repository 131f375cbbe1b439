//! Compiles `slipway/v1/*.proto` with protox (pure Rust, no system `protoc`), generates the prost
//! types and their canonical proto3 JSON (pbjson), embeds the descriptor set for the contract
//! check, and generates the run event kind table from the `publisher` options.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use prost_reflect::{DescriptorPool, Value};

fn main() -> Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_dir = manifest.join("slipway/v1");
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let mut files: Vec<PathBuf> = std::fs::read_dir(&proto_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|p| p.strip_prefix(&manifest).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;

    let mut compiler = protox::Compiler::new([&manifest])?;
    compiler.include_imports(true).include_source_info(false);
    compiler
        .open_files(&relative)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("compiling slipway/v1")?;
    let fds = compiler.file_descriptor_set();
    let fds_bytes = compiler.encode_file_descriptor_set();
    std::fs::write(out.join("slipway_v1.binpb"), &fds_bytes)?;

    prost_build::Config::new()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .enable_type_names()
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&fds_bytes)?
        // Forward compatibility, as in protobuf: a newer producer's fields and enum values are
        // skipped by an older reader, not refused.
        .ignore_unknown_fields()
        .ignore_unknown_enum_variants()
        .build(&[".slipway.v1"])?;

    let kinds = event_kinds(&compiler.descriptor_pool())?;
    std::fs::write(out.join("event_kinds.rs"), kinds)?;
    Ok(())
}

/// Reads `RunEvent.payload` and the `publisher` option of each of its fields.
fn event_kinds(pool: &DescriptorPool) -> Result<String> {
    let event = pool
        .get_message_by_name("slipway.v1.RunEvent")
        .context("slipway.v1.RunEvent missing")?;
    let ext = pool
        .get_extension_by_name("slipway.v1.publisher")
        .context("slipway.v1.publisher option missing")?;
    let publisher_enum = pool
        .get_enum_by_name("slipway.v1.Publisher")
        .context("slipway.v1.Publisher missing")?;
    let oneof = event
        .oneofs()
        .find(|o| o.name() == "payload")
        .context("RunEvent.payload missing")?;

    let mut rows = Vec::new();
    for field in oneof.fields() {
        let options = field.options();
        if !options.has_extension(&ext) {
            bail!("RunEvent.{} has no (publisher) option", field.name());
        }
        let Value::EnumNumber(number) = options.get_extension(&ext).into_owned() else {
            bail!("RunEvent.{}: (publisher) is not an enum", field.name());
        };
        let value = publisher_enum
            .get_value(number)
            .context("unknown publisher value")?;
        let publisher = camel(
            value
                .name()
                .strip_prefix("PUBLISHER_")
                .context("publisher prefix")?
                .to_lowercase()
                .as_str(),
        );
        if publisher == "Unspecified" {
            bail!("RunEvent.{}: publisher is unspecified", field.name());
        }
        rows.push((field.name().to_string(), camel(field.name()), publisher));
    }

    let mut s = String::new();
    writeln!(
        s,
        "/// A run event kind: the `RunEvent.payload` field it is carried in."
    )?;
    writeln!(
        s,
        "#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]"
    )?;
    writeln!(s, "pub enum EventKind {{")?;
    for (token, variant, _) in &rows {
        writeln!(s, "    /// `{token}`")?;
        writeln!(s, "    {variant},")?;
    }
    writeln!(s, "}}\n")?;
    writeln!(s, "impl EventKind {{")?;
    writeln!(s, "    /// Every kind, in field order.")?;
    writeln!(s, "    pub const ALL: &'static [EventKind] = &[")?;
    for (_, variant, _) in &rows {
        writeln!(s, "        EventKind::{variant},")?;
    }
    writeln!(s, "    ];\n")?;
    writeln!(
        s,
        "    /// The snake_case subject token (`slipway.runs.<run>.events.<token>`)."
    )?;
    writeln!(
        s,
        "    pub fn token(self) -> &'static str {{\n        match self {{"
    )?;
    for (token, variant, _) in &rows {
        writeln!(s, "            EventKind::{variant} => \"{token}\",")?;
    }
    writeln!(s, "        }}\n    }}\n")?;
    writeln!(
        s,
        "    /// The single component allowed to publish this kind."
    )?;
    writeln!(
        s,
        "    pub fn publisher(self) -> crate::v1::Publisher {{\n        match self {{"
    )?;
    for (_, variant, publisher) in &rows {
        writeln!(
            s,
            "            EventKind::{variant} => crate::v1::Publisher::{publisher},"
        )?;
    }
    writeln!(s, "        }}\n    }}\n")?;
    writeln!(s, "    /// The kind whose token is `token`.")?;
    writeln!(
        s,
        "    pub fn from_token(token: &str) -> Option<Self> {{\n        match token {{"
    )?;
    for (token, variant, _) in &rows {
        writeln!(s, "            \"{token}\" => Some(EventKind::{variant}),")?;
    }
    writeln!(s, "            _ => None,\n        }}\n    }}\n}}\n")?;
    writeln!(s, "impl crate::v1::run_event::Payload {{")?;
    writeln!(s, "    /// The kind of this payload.")?;
    writeln!(
        s,
        "    pub fn kind(&self) -> EventKind {{\n        match self {{"
    )?;
    for (_, variant, _) in &rows {
        writeln!(s, "            Self::{variant}(_) => EventKind::{variant},")?;
    }
    writeln!(s, "        }}\n    }}\n}}")?;
    Ok(s)
}

fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}
