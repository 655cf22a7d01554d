//! `magcache`: run diffusion transformers with timestep caching, side by side with dense.

use clap::{Parser, Subcommand};
use magcache_cli::{generate, list, prepare, summary, write_atomic, write_latents, Verbosity};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "magcache",
    version,
    about = "Timestep caching (MagCache, FBCache, ...) for diffusion transformers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one generation as the config says and report every transformer call.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Final latents (safetensors, tensor `final`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// JSON report of every call.
        #[arg(long)]
        report: Option<PathBuf>,
        /// No progress bar and no summary.
        #[arg(long)]
        quiet: bool,
        /// Print the report as JSON on stdout instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// List registered model families, presets and strategies.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.to_string().replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> magcache_core::Result<()> {
    match cli.cmd {
        Cmd::List => {
            print!("{}", list());
            Ok(())
        }
        Cmd::Run {
            config,
            out,
            report,
            quiet,
            json,
        } => {
            let mut p = prepare(&config)?;
            if !quiet && !json {
                eprintln!("{}", p.pipeline.describe());
            }
            let (latents, rep) = generate(
                &mut p,
                if quiet || json {
                    Verbosity::Quiet
                } else {
                    Verbosity::Normal
                },
            )?;
            if let Some(o) = &out {
                write_latents(o, &latents)?;
            }
            if let Some(r) = &report {
                let text = serde_json::to_string_pretty(&rep)
                    .map_err(|e| magcache_core::Error::msg(e.to_string()))?;
                write_atomic(r, text.as_bytes())?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&rep)
                        .map_err(|e| magcache_core::Error::msg(e.to_string()))?
                );
            } else if !quiet {
                print!("{}", summary(&rep));
            }
            Ok(())
        }
    }
}
