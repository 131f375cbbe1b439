//! The command line every service binary shares, so each `main.rs` is one call.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::app::App;
use crate::config::{Settings, Sources};
use crate::shutdown::Shutdown;
use crate::subjects::Service;

#[derive(Debug, Parser)]
pub struct ServiceArgs {
    /// A TOML configuration file; `SLIPWAY__SECTION__KEY` variables override it.
    #[arg(long, env = "SLIPWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The default health port of each service on one machine (Kubernetes sets `health.listen`).
pub fn default_health_listen(service: Service) -> &'static str {
    match service {
        Service::Planner => "127.0.0.1:9101",
        Service::Executor => "127.0.0.1:9102",
        Service::Preview => "127.0.0.1:9103",
        Service::Billing => "127.0.0.1:9104",
        Service::Deployer => "127.0.0.1:9105",
    }
}

/// Loads the settings of `service` from the process's file and environment.
pub fn load_settings(
    service: Service,
    file: Option<PathBuf>,
) -> Result<Settings, crate::config::ConfigError> {
    Settings::load(
        &Sources::from_process(file).with_default("health.listen", default_health_listen(service)),
    )
}

/// What a service prints, once, before the bound health address.
pub const HEALTH_LINE: &str = "health http://";

/// Everything a service binary does: arguments, settings, telemetry, signals, the service's own
/// `serve`, graceful shutdown. `serve` registers the service's work on the app and runs it.
pub fn service_main<F, Fut>(service: Service, serve: F) -> ExitCode
where
    F: FnOnce(App) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args = ServiceArgs::parse();
    let settings = match load_settings(service, args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("slipway-{service}: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", settings.to_masked_toml());
        return ExitCode::SUCCESS;
    }
    let telemetry = match crate::telemetry::init(service.as_str(), &settings.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("slipway-{service}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slipway-{service}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals()?;
        let app = App::start(service, settings, shutdown).await?;
        // The address health is bound to, said once on its own line on stderr (stdout carries
        // the logs, JSON ones included), so whoever started the process (a test, a supervisor)
        // needs no free-port guessing: `health http://ADDR`.
        {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{HEALTH_LINE}{}", app.health_addr);
        }
        serve(app).await
    });
    telemetry.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting on error");
            eprintln!("slipway-{service}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
