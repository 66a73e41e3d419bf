//! sage: run Mixture-of-Experts models with experts streamed through a fixed-size arena.
//!
//! The runtime (`sage run`) is not built yet; today this binary inspects model directories.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sage", version, about = "Run Mixture-of-Experts models on devices smaller than the model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a model directory (from sage-convert) or a GGUF holds.
    Inspect {
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = ["warn", "info", "debug"][cli.verbose.min(2) as usize];
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).format_timestamp(None).init();
    sage::ggml::route_logs();
    let result: anyhow::Result<()> = match cli.command {
        Command::Inspect { path, json } => sage::inspect::inspect(&path)
            .with_context(|| format!("inspecting {}", path.display()))
            .and_then(|i| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&i)?);
                } else {
                    print!("{i}");
                }
                Ok(())
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sage: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
