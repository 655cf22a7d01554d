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
    /// Run without skipping and write the MagCache calibration profile of the run.
    Calibrate {
        #[arg(long)]
        config: PathBuf,
        /// The profile (TOML) to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        quiet: bool,
    },
    /// Predict the compute/reuse map of a MagCache run without running the model.
    Plan {
        #[arg(long)]
        config: PathBuf,
        /// Print the plan as JSON.
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
        Cmd::Calibrate { config, out, quiet } => {
            let (profile, report) = magcache_cli::calibrate(
                &config,
                if quiet {
                    Verbosity::Quiet
                } else {
                    Verbosity::Normal
                },
            )?;
            write_atomic(&out, profile.to_toml()?.as_bytes())?;
            if !quiet {
                println!(
                    "calibrated {} calls over {} steps in {:.3} s; profile written to {}",
                    report.total_calls,
                    profile.meta.steps,
                    report.wall_seconds,
                    out.display()
                );
            }
            Ok(())
        }
        Cmd::Plan { config, json } => {
            let r = magcache_cli::plan(&config)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&r)
                        .map_err(|e| magcache_core::Error::msg(e.to_string()))?
                );
            } else {
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
                print!("{}", magcache_cli::plan_text(&r));
            }
            Ok(())
        }
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
