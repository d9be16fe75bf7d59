//! `mqseal-agent --config agent.toml`: the Linux device agent.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mqseal_agent::agent::Restore;

/// Executes verified mqseal commands on this device.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The agent's configuration (written by `mqseal device add`).
    #[arg(long, env = "MQSEAL_AGENT_CONFIG")]
    config: PathBuf,
    /// Discard a damaged state file. Every sealed command issued before the
    /// reset is then refused for good, so no replay window opens; commands
    /// issued once the allowed clock skew has passed are accepted.
    #[arg(long)]
    reset_state: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MQSEAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let restore = if args.reset_state { Restore::Reset } else { Restore::Load };
    match mqseal_agent::run::run(&args.config, restore).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqseal-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
