//! The `slipway` command line.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use slipway_common::auth::{self, Credential, Principal, User};
use slipway_common::config::{Settings, Sources};
use slipway_common::setup::{self, Mode};
use slipway_common::topology::Topology;

#[derive(Debug, Parser)]
#[command(
    name = "slipway",
    version,
    about = "Slipway: one prompt to a deployed web app"
)]
pub struct Cli {
    /// A TOML configuration file; `SLIPWAY__SECTION__KEY` variables override it.
    #[arg(long, global = true, env = "SLIPWAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the streams, consumers, KV buckets and object stores (idempotent); report drift.
    Setup {
        /// Also correct drifted configuration where JetStream allows it, and move a partitioned
        /// stream to a changed partition count in the safe order.
        #[arg(long)]
        update: bool,
        /// Only verify; create nothing.
        #[arg(long, conflicts_with = "update")]
        check: bool,
        /// With `--update`: how long to wait for the old partition consumers to drain before
        /// leaving the move half-done (the next `--update` carries on).
        #[arg(long, default_value_t = 120, value_name = "SECONDS")]
        drain_timeout: u64,
    },
    /// NATS authorization for Slipway's components.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Print the effective configuration, secrets masked.
    Config,
    /// Dead letters: messages a worker gave up, with the reason (admin principal).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first: sequence, stream, subject, reason code and reason.
    List {
        /// Only those of this stream (`PROMPTS`, `USAGE`, `DEPLOY_JOBS`, ...).
        stream: Option<String>,
    },
    /// Put dead letter SEQ back on its original subject (once the cause is fixed) and remove it
    /// from the dead letters.
    Replay {
        /// Its sequence in the `DLQ` stream, as `list` shows it.
        seq: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Generate one nkey per component (`<name>.nk`, mode 0600) and the nats-server
    /// `authorization` block (`authorization.conf`) with least-privilege permissions.
    Generate {
        /// The directory to write into; existing seeds are kept, so re-running is safe.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Print the permissions of every component.
    Show,
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let settings = || Settings::load(&Sources::from_process(cli.config.clone()));
    match cli.command {
        Command::Config => {
            print!("{}", settings()?.to_masked_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup {
            update,
            check,
            drain_timeout,
        } => {
            let settings = settings()?;
            let drain = setup::DrainWait {
                timeout: std::time::Duration::from_secs(drain_timeout),
                ..Default::default()
            };
            setup_command(&settings, update, check, drain).await
        }
        Command::Dlq { command } => {
            let client = connect_once(&settings()?).await?;
            let js = async_nats::jetstream::new(client);
            dlq_command(&js, command).await
        }
        Command::Auth {
            command: AuthCommand::Generate { out_dir },
        } => {
            let topo = Topology::new(&settings()?.setup);
            let path = generate_auth(&out_dir, &topo)?;
            println!(
                "wrote {} and one seed per component in {}",
                path.display(),
                out_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Auth {
            command: AuthCommand::Show,
        } => {
            let topo = Topology::new(&settings()?.setup);
            for p in Principal::all() {
                let perms = auth::permissions(p, &topo);
                println!("{}:", p.name());
                println!(
                    "  publish:   {}",
                    perms.publish.iter().cloned().collect::<Vec<_>>().join(" ")
                );
                println!(
                    "  subscribe: {}",
                    perms
                        .subscribe
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn setup_command(
    settings: &Settings,
    update: bool,
    check: bool,
    drain: setup::DrainWait,
) -> Result<ExitCode> {
    let client = connect_once(settings).await?;
    let js = async_nats::jetstream::new(client.clone());
    let topo = Topology::new(&settings.setup);
    if check {
        let drifts = setup::verify(&js, &topo).await?;
        for d in &drifts {
            println!("drift    {d}");
        }
        println!("{} drift(s)", drifts.len());
        return Ok(if drifts.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let mode = if update {
        Mode::Update
    } else {
        Mode::CreateMissing
    };
    let report = setup::apply_with(&js, &topo, mode, drain).await?;
    for r in &report.created {
        println!("created  {r}");
    }
    for r in &report.updated {
        println!("updated  {r}");
    }
    for r in &report.deleted {
        println!("deleted  {r}");
    }
    for r in &report.unchanged {
        println!("ok       {r}");
    }
    for d in &report.drifted {
        println!("drift    {d}");
    }
    client.flush().await.ok();
    if report.drifted.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("configuration drifted: `slipway setup --update` corrects what JetStream allows");
        Ok(ExitCode::FAILURE)
    }
}

async fn dlq_command(js: &async_nats::jetstream::Context, command: DlqCommand) -> Result<ExitCode> {
    use slipway_common::deadletter;
    match command {
        DlqCommand::List { stream } => {
            let entries = deadletter::list(js, stream.as_deref()).await?;
            if entries.is_empty() {
                println!("no dead letters");
            }
            for e in entries {
                println!(
                    "{seq}\t{stream}#{orig}\t{subject}\t{code}\tdelivered {n}\t{time}\t{message}",
                    seq = e.sequence,
                    stream = e.reason.stream,
                    orig = e.reason.stream_sequence,
                    subject = e.reason.subject,
                    code = e.reason.code,
                    n = e.reason.delivered,
                    time = e.time,
                    message = e.reason.message,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { seq } => {
            let new = deadletter::replay(js, seq).await?;
            println!("dead letter {seq} replayed (stream sequence {new})");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A connection for a one-shot command: fails fast instead of retrying forever.
async fn connect_once(settings: &Settings) -> Result<async_nats::Client> {
    let mut options = match (
        &settings.nats.nkey_seed,
        &settings.nats.user,
        &settings.nats.password,
    ) {
        (Some(seed), _, _) => async_nats::ConnectOptions::with_nkey(seed.expose().to_string()),
        (None, Some(u), Some(p)) => {
            async_nats::ConnectOptions::with_user_and_password(u.clone(), p.expose().to_string())
        }
        _ => async_nats::ConnectOptions::new(),
    };
    options = options
        .name("slipway-cli")
        .connection_timeout(Duration::from_millis(settings.nats.connect_timeout_ms));
    let principal = match settings.cli.principal {
        slipway_common::config::CliPrincipal::Platform => Principal::Platform,
        slipway_common::config::CliPrincipal::Admin => Principal::Admin,
    };
    if let Some(prefix) = &settings.nats_as(principal).inbox_prefix {
        options = options.custom_inbox_prefix(prefix.clone());
    }
    options
        .connect(settings.nats.url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", settings.nats.url))
}

/// Writes `<name>.nk` seeds (kept when present) and `authorization.conf`.
pub fn generate_auth(out_dir: &Path, topo: &Topology) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(out_dir)?;
    let mut users = Vec::new();
    for principal in Principal::all() {
        let path = out_dir.join(format!("{}.nk", principal.name()));
        let pair = match std::fs::read_to_string(&path) {
            Ok(seed) => nkeys::KeyPair::from_seed(seed.trim())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(_) => {
                let pair = nkeys::KeyPair::new_user();
                let seed = pair.seed().map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                std::io::Write::write_all(&mut file, seed.as_bytes())?;
                pair
            }
        };
        users.push(User {
            principal,
            credential: Credential::Nkey(pair.public_key()),
        });
    }
    let conf = out_dir.join("authorization.conf");
    std::fs::write(&conf, auth::authorization_config(&users, topo))?;
    Ok(conf)
}
