//! The `magcache` command line (`run`, `compare`, `calibrate`, `plan`, `tune`, `export`, `list`, `serve`) as a library
//! function, [`main`]: the `magcache` binary and a model crate's own runner binary call it.

use crate::args::{CalibrateArgs, CompareArgs, ExportArgs, PlanArgs, RunArgs, ServeArgs, TuneArgs};
use crate::{commands, install_signal_cleanup};
use clap::{Parser, Subcommand};
use magcache_core::{Error, Result};
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
    Run(RunArgs),
    /// Run dense and cached on the same inputs and compare speed and quality.
    Compare(CompareArgs),
    /// Run without skipping and write the MagCache calibration profile of the run.
    Calibrate(CalibrateArgs),
    /// Predict a run's compute/reuse map without running the model (MagCache, a schedule,
    /// spectrum; strategies that decide from the data, as FBCache and TeaCache, show no calls),
    /// with its dtype, memory estimate and warnings.
    Plan(PlanArgs),
    /// Write a preset's seeded random weights (in the run's dtype) as a new checkpoint folder in the
    /// diffusers layout, sharded with an index, generated tensor by tensor.
    Export(ExportArgs),
    /// Choose a strategy, estimator and setting for a target from a calibration run and a few real
    /// runs on the run's inputs; write the run file with the chosen `[cache]` (and its profile).
    Tune(TuneArgs),
    /// List registered model families, presets and strategies.
    List,
    /// Keep the run files' models warm behind an OpenAI-compatible HTTP API (docs/serve.md).
    Serve(ServeArgs),
}

/// The `magcache` command line: parses the process's arguments, runs the command and returns its exit
/// code (on an error, one line `error: ...` on stderr and exit code 1).
///
/// A model crate's binary gets the whole runner for its family from it:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     // my_model::link(); // keeps the family's registration linked in
///     magcache_cli::main()
/// }
/// ```
///
/// The strategies are part of the runner and linked here; model families are not: the binary links
/// its own (`magcache_models::link()` in the `magcache` binary).
pub fn main() -> ExitCode {
    // First, before any large block: where the binary installs `alloc::LineAlloc`, the variable
    // switches its alignment (a bad value is reported with the other switches, in `real_main`).
    let line_alloc = magcache_layers::alloc::switch_from_env();
    passive_openmp();
    pin_thread_count();
    magcache_strategies::link();
    let cli = Cli::parse();
    // `MAGCACHE_IN_POOL=on`: the command runs on one of rayon's workers (not `serve`, whose
    // threads are its own), so that each parallel pass wakes one other thread, not every worker
    // while this one sleeps (a 720-token Wan run on an AMX Xeon: 2 932 context switches against
    // 15 841; docs/benchmarks.md). A bad value is an error here, before the command runs.
    let in_pool = magcache_layers::env::env_switch(IN_POOL_ENV, "off");
    let r = match in_pool {
        Ok(Some(true)) if !matches!(cli.cmd, Cmd::Serve(_)) => {
            rayon::scope(move |_| real_main(cli, line_alloc))
        }
        Err(e) => Err(Error::msg(e)),
        _ => real_main(cli, line_alloc),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.to_string().replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

/// The switch that runs a command on one of rayon's worker threads (`on`; unset: off).
pub const IN_POOL_ENV: &str = "MAGCACHE_IN_POOL";

/// Sets `OMP_WAIT_POLICY=passive` where `MAGCACHE_ONEDNN` names oneDNN and the user set none of
/// it, `GOMP_SPINCOUNT`, `KMP_BLOCKTIME`, `KMP_LIBRARY`. oneDNN's products run on OpenMP's threads, the rest of a call (norms,
/// modulation, the attention's tasks) on rayon's: OpenMP's idle threads spin after each product
/// by default (libgomp: up to 300 000 rounds), taking cores from rayon's work. Passive, they
/// sleep; a 720-token Wan call on a 2-core Zen 5 ran a median 1.16x faster in bf16 on oneDNN,
/// 1.03-1.11x in f32 (docs/benchmarks.md). Runs first, before any other thread exists and before
/// the library (and its OpenMP, which reads the variable once) loads.
fn passive_openmp() {
    use magcache_layers::nn::onednn;
    let named = onednn::named(std::env::var(onednn::ENV).ok().as_deref()).is_some();
    // libgomp's and Intel OpenMP's (the iomp builds') own settings of the same thing.
    let chosen = [
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "KMP_BLOCKTIME",
        "KMP_LIBRARY",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some());
    if named && !chosen {
        std::env::set_var("OMP_WAIT_POLICY", "passive");
    }
}

/// Sets `RAYON_NUM_THREADS` to candle's thread count when the user did not: candle 0.11 computes
/// its default (the physical cores) anew at every matrix product and every CPU kernel's split,
/// reading and parsing `/proc/cpuinfo` each time (`num_cpus::get_physical`; on a many-core server
/// a file of hundreds of KB), while it reads a set variable directly. Runs first, before any other
/// thread exists; rayon's global pool is built before the variable is set, so it keeps its own
/// default size (the logical CPUs) as before.
fn pin_thread_count() {
    let set = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    if !set {
        let n = candle_core::utils::get_num_threads().max(1);
        // An error only says the pool exists already: then it keeps the size it has.
        let _ = rayon::ThreadPoolBuilder::new().build_global();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// `line_alloc`: what reading `MAGCACHE_LINE_ALLOC` at start gave.
fn real_main(cli: Cli, line_alloc: std::result::Result<(), String>) -> Result<()> {
    // Switches read deep in a run are checked first: a value they do not take is an error.
    magcache_core::runtime::progress::check_env()?;
    magcache_layers::nn::bf16_gemm::check_switch()?;
    magcache_layers::nn::bf16_gemm::amx::check_switch()?;
    magcache_layers::nn::f32_gemm::check_switch()?;
    line_alloc.map_err(Error::msg)?;
    // AMX's tiles are asked of Linux here, once, before a model loads (a refusal is one note).
    magcache_layers::nn::bf16_gemm::amx::usable();
    // The server answers SIGINT/SIGTERM itself (it writes no temporary file).
    if let Cmd::Serve(a) = cli.cmd {
        return crate::serve::serve(a);
    }
    install_signal_cleanup();
    let config = match &cli.cmd {
        Cmd::Calibrate(a) => Some(a.config.clone()),
        Cmd::Plan(a) => Some(a.config.clone()),
        Cmd::Tune(a) => Some(a.config.clone()),
        Cmd::Export(a) => Some(a.config.clone()),
        Cmd::Compare(a) => Some(a.config.clone()),
        Cmd::Run(a) => Some(a.config.clone()),
        Cmd::List | Cmd::Serve(_) => None,
    };
    let r = match cli.cmd {
        Cmd::Serve(_) => Ok(()),
        Cmd::Calibrate(a) => commands::calibrate(a),
        Cmd::Plan(a) => commands::plan(a),
        Cmd::List => commands::list(),
        Cmd::Tune(a) => commands::tune(a),
        Cmd::Export(a) => commands::export(a),
        Cmd::Compare(a) => commands::compare(a),
        Cmd::Run(a) => commands::run(a),
    };
    r.map_err(|e| match config {
        Some(c) => in_run_file(e, &c),
        None => e,
    })
}

/// An error about the run that names no file (values that went non-finite, a strategy's check of
/// its keys against the model at the first call: `cache.KEY ...`) prefixed with the run file, as
/// every other error line names the file it is about.
fn in_run_file(e: Error, config: &std::path::Path) -> Error {
    match e {
        Error::NonFinite { .. } => Error::msg(format!("{}: {e}", config.display())),
        Error::Msg(m)
            if crate::prepare::names_cache_key(&m)
                && !m.contains(&config.display().to_string()) =>
        {
            Error::msg(format!("{}: {m}", config.display()))
        }
        e => e,
    }
}
