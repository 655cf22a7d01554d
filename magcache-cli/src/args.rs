//! The arguments of each command of the command line ([`crate::main`]).

use clap::Args;
use std::path::PathBuf;

/// The arguments of `magcache run`.
#[derive(Args)]
pub(crate) struct RunArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// Final latents (safetensors, tensor `final`).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// JSON report of every call.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// No progress bar and no summary.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Print the report as JSON on stdout instead of the summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// A picture: the decoded image or frames of a prompted run, else the final latents as a
    /// grid of planes (PNG).
    #[arg(long)]
    pub(crate) png: Option<PathBuf>,
    /// The decoded frames of a prompted run: .mp4 (H.264, written in process), .gif, or .png
    /// (frame grid); a picture model's (FLUX, Z-Image...) as one frame.
    #[arg(long)]
    pub(crate) video: Option<PathBuf>,
    /// Frames per second of --video (default: the model's, Wan 16, Wan2.2 TI2V 24).
    #[arg(long, requires = "video")]
    pub(crate) fps: Option<u32>,
}

/// The arguments of `magcache compare`.
#[derive(Args)]
pub(crate) struct CompareArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// The per-call compute/reuse map with the strategy's metric and threshold (SVG).
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Dense | cached | |difference| x4 side by side (PNG): the decoded image of a prompted
    /// run (a video: one row per frame, at most 9 evenly spaced), else the final latents'
    /// planes as three rows.
    #[arg(long)]
    pub(crate) png: Option<PathBuf>,
    /// Dense | cached | |difference| x4 side by side as a video, for a prompted video run:
    /// .mp4 (H.264, written in process), .gif, or .png (frame grid).
    #[arg(long)]
    pub(crate) video: Option<PathBuf>,
    /// Frames per second of --video (default: the model's, Wan 16).
    #[arg(long, requires = "video")]
    pub(crate) fps: Option<u32>,
    /// Value range for PSNR/SSIM and pictures (default: the dense result's max - min).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) data_range: Option<f64>,
    /// Timed runs of each kind, dense and cached alternated, after one untimed warm-up run;
    /// the wall times reported are the medians.
    #[arg(long, default_value_t = 1)]
    pub(crate) repeat: usize,
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The arguments of `magcache calibrate`.
#[derive(Args)]
pub(crate) struct CalibrateArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// The profile (TOML) to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Also probe every block (two hooks on each: its residual change between calls and its
    /// time); prints a table and writes `block_change` into the profile.
    #[arg(long)]
    pub(crate) blocks: bool,
    /// Fit the fitted estimator (`estimator = "fitted"`) for a schedule: per-channel coefficients
    /// per reused call, trained through whole cached runs on seeded inputs; writes them into the
    /// profile's `[fitted]` table.
    #[arg(long)]
    pub(crate) fit: bool,
    /// With `--fit`: computed calls per scope (the schedule is searched from the calibration).
    #[arg(long)]
    pub(crate) budget: Option<usize>,
    /// With `--fit`: the schedule itself (`0,6,11,...`), instead of `--budget`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) compute_steps: Option<Vec<usize>>,
    #[command(flatten)]
    pub(crate) fit_args: FitArgs,
    /// With `--fit`: the PSNR's data range on the validation seeds (default: the dense run's).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) data_range: Option<f64>,
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// The fit's own arguments, shared by `calibrate --fit` and `tune --fit` (refused without
/// `--fit`; defaults in [`crate::FitOptions::default`]).
#[derive(Args)]
pub(crate) struct FitArgs {
    /// With `--fit`: Adam iterations (default 30; 0 keeps the order-1 forecast the fit starts
    /// from).
    #[arg(long)]
    pub(crate) iterations: Option<usize>,
    /// With `--fit`: Adam's learning rate (default 0.01).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) learning_rate: Option<f64>,
    /// With `--fit`: the computed residuals each reused call combines (default 2: the last two,
    /// where the order-1 forecast starts; up to 4).
    #[arg(long)]
    pub(crate) history: Option<usize>,
    /// With `--fit`: the noise seeds of the calibration batch, the fit's loss (default
    /// 1000,1001,1002,1003).
    #[arg(long, value_delimiter = ',')]
    pub(crate) calibration_seeds: Option<Vec<u64>>,
    /// With `--fit`: the held-out seeds that choose the kept iterate (default 2000,2001).
    #[arg(long, value_delimiter = ',')]
    pub(crate) validation_seeds: Option<Vec<u64>>,
    /// With `--fit`: where the coefficients start, the order-1 forecast in `sigma` or in `step`
    /// index (default: `calibrate` sigma, `tune` the axis of the schedule it fits).
    #[arg(long)]
    pub(crate) start_axis: Option<String>,
    /// With `calibrate --fit`: continue the fit in this profile's `[fitted]` table (its schedule,
    /// axis, history and coefficients) instead of starting from the order-1 forecast, e.g. on
    /// more calibration seeds.
    #[arg(long)]
    pub(crate) start_profile: Option<PathBuf>,
    /// With `--fit`: one set of coefficients per classifier-free-guidance branch (cond, uncond)
    /// instead of one shared set; with `--start-profile`, each branch starts from the profile's.
    #[arg(long)]
    pub(crate) per_branch: bool,
}

impl FitArgs {
    /// The first fit flag given, if any (for refusing it without `--fit`).
    pub(crate) fn first_given(&self) -> Option<&'static str> {
        [
            (self.iterations.is_some(), "--iterations"),
            (self.learning_rate.is_some(), "--learning-rate"),
            (self.history.is_some(), "--history"),
            (self.calibration_seeds.is_some(), "--calibration-seeds"),
            (self.validation_seeds.is_some(), "--validation-seeds"),
            (self.start_axis.is_some(), "--start-axis"),
            (self.start_profile.is_some(), "--start-profile"),
            (self.per_branch, "--per-branch"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// The arguments of `magcache plan`.
#[derive(Args)]
pub(crate) struct PlanArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// Print the plan as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The arguments of `magcache export`.
#[derive(Args)]
pub(crate) struct ExportArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// The folder to create (must not exist).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Largest shard, in GB (diffusers-style `-0000k-of-0000n` shards past it).
    #[arg(long, allow_negative_numbers = true, default_value_t = 5.0)]
    pub(crate) shard_gb: f64,
    /// Write one GGUF file per transformer instead, its matrices quantized to this type
    /// (`q8_0`, `q4_0`, `q4_k`, ...; Wan families).
    #[arg(long)]
    pub(crate) gguf: Option<String>,
    /// Write a pipeline folder: the transformer under `transformer/` and the family's other
    /// released parts beside it at their released sizes (Wan text-to-video: the UMT5-XXL text
    /// encoder and the VAE), every tensor in the run's dtype.
    #[arg(long, conflicts_with = "gguf")]
    pub(crate) pipeline: bool,
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// The arguments of `magcache tune`.
#[derive(Args)]
pub(crate) struct TuneArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// The run file to write (its calibration profile is written beside it, as
    /// `NAME.profile.toml`).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Keep at least this PSNR (dB) against the dense run with the fewest computed calls.
    #[arg(long, allow_negative_numbers = true, conflicts_with = "target_speedup")]
    pub(crate) target_psnr: Option<f64>,
    /// Compute at most 1/S of the calls with the best PSNR.
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) target_speedup: Option<f64>,
    /// Value range for PSNR (default: the dense result's max - min).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) data_range: Option<f64>,
    /// With --target-psnr: dB above the target a setting must keep on these inputs [default: 0.5].
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) margin: Option<f64>,
    /// Most settings tried (each is run on the tune's inputs, two by default), besides the
    /// calibration run.
    #[arg(long, default_value_t = 24)]
    pub(crate) runs: usize,
    /// Also fit the fitted estimator (`estimator = "fitted"`, as `calibrate --fit`) on the best
    /// schedule found and run it as one more candidate: with `--target-speedup` on the chosen
    /// schedule, with `--target-psnr` on the best schedule one call cheaper.
    #[arg(long)]
    pub(crate) fit: bool,
    #[command(flatten)]
    pub(crate) fit_args: FitArgs,
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The arguments of `magcache serve` (each but `--config` may also come from a run file's
/// `[serve]` table; the command line wins).
#[derive(Args)]
pub(crate) struct ServeArgs {
    /// A run file to serve (repeat for several models; each one's id is its file stem).
    #[arg(long, required = true)]
    pub(crate) config: Vec<PathBuf>,
    /// The address to listen on (default 127.0.0.1: loopback unless told otherwise).
    #[arg(long)]
    pub(crate) host: Option<String>,
    /// The port (default 8000; 0: any free port, printed at start).
    #[arg(long)]
    pub(crate) port: Option<u16>,
    /// Requests must send `Authorization: Bearer KEY` (also read from MAGCACHE_API_KEY).
    #[arg(long, env = "MAGCACHE_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Jobs waiting per model before requests get 429 (default 16).
    #[arg(long)]
    pub(crate) max_queue: Option<usize>,
    /// A host name requests may name (`Host`) and browser pages may come from (`Origin`) besides
    /// this server's own: the public name behind a reverse proxy (repeat for several).
    #[arg(long)]
    pub(crate) allow_host: Vec<String>,
}

/// `--data-range`, when given: a finite number > 0 (`compare`, `tune`, `calibrate --fit`).
pub(crate) fn check_data_range(data_range: Option<f64>) -> magcache_core::Result<()> {
    match data_range {
        Some(r) if !(r.is_finite() && r > 0.0) => Err(magcache_core::Error::msg(format!(
            "--data-range {r}: must be a finite number > 0 (the value range of the results)"
        ))),
        _ => Ok(()),
    }
}

/// The first value of `v` given twice.
pub(crate) fn repeated(v: &[u64]) -> Option<u64> {
    v.iter()
        .enumerate()
        .find(|(i, s)| v[..*i].contains(s))
        .map(|(_, s)| *s)
}
