//! Flow-matching Euler sampling (diffusers `FlowMatchEulerDiscreteScheduler`), and the choice between
//! it and UniPC ([`crate::unipc`]) for the static-shift (Wan) loops.

use crate::unipc::{UniPc, UniPcConfig, UniPcSchedule, UNIPC_CLASS};
use candle_core::Tensor;
use magcache_core::{Error, Result};
use std::path::{Path, PathBuf};

mod shifted;
pub use shifted::{flow_match_dynamic, flow_match_shifted};
use shifted::{linspace, stretch_to_terminal};

/// The sampler's schedule: `timesteps[i]` (0..1000) for each step and `sigmas` with a final 0.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

impl FlowSchedule {
    /// A UniPC schedule as the loops see it (timesteps as floats).
    pub fn from_unipc(u: &UniPcSchedule) -> Self {
        FlowSchedule {
            timesteps: u.timesteps.iter().map(|&t| t as f32).collect(),
            sigmas: u.sigmas.clone(),
        }
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Euler step size of step `i`: `sigma[i+1] - sigma[i]` (in f32, as the reference); 0 past
    /// the sigmas ([`FlowSchedule::check_lengths`] refuses such a schedule).
    pub fn dt(&self, i: usize) -> f32 {
        match (self.sigmas.get(i), self.sigmas.get(i + 1)) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        }
    }

    /// An error unless there is one sigma per step and a final one (`sigmas.len() ==
    /// timesteps.len() + 1`), as every sampler of a flow schedule reads them: a schedule built by
    /// hand with one sigma per step would have no size for its last step.
    pub fn check_lengths(&self) -> Result<()> {
        if self.sigmas.len() != self.timesteps.len() + 1 {
            return Err(Error::msg(format!(
                "flow schedule: {} timesteps need {} sigmas (one per step and a final one), not {}",
                self.timesteps.len(),
                self.timesteps.len() + 1,
                self.sigmas.len()
            )));
        }
        Ok(())
    }
}

impl FlowSchedule {
    /// An error naming `file` and `key` (the setting that shaped the schedule, e.g. `sampling.shift`)
    /// when a timestep or sigma is not finite or a sigma lies outside `[0, 1]`: such a schedule gives
    /// NaN latents from the first step.
    pub fn check(&self, file: &str, key: &str, value: f64) -> magcache_core::Result<()> {
        let bad = self
            .sigmas
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && (0.0..=1.0).contains(*s)))
            .map(|(i, s)| format!("sigma {i} = {s}"))
            .or_else(|| {
                self.timesteps
                    .iter()
                    .enumerate()
                    .find(|(_, t)| !t.is_finite())
                    .map(|(i, t)| format!("timestep {i} = {t}"))
            });
        match bad {
            None => Ok(()),
            Some(b) => Err(magcache_core::Error::config(
                file,
                key,
                format!("{} gives a noise schedule that is not finite or leaves [0, 1] ({b}); use a moderate value (Wan uses 3 to 12)", short(value)),
            )),
        }
    }
}

/// `5`, `0.25`, `1e-300`: a number as a user would write it.
fn short(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Static shift (Wan): the training sigmas are shifted, their ends give the inference range, and the
/// evenly spaced inference sigmas are shifted again: `s' = shift s / (1 + (shift - 1) s)`.
pub fn flow_match_static(steps: usize, shift: f64) -> FlowSchedule {
    let n_train = 1000usize;
    // The shifted training sigma at t = 1 (float32 arithmetic, as torch does it).
    let s_min_raw = 1.0f32 / n_train as f32;
    let sh = shift as f32;
    let sigma_min = (sh * s_min_raw / (1.0 + (sh - 1.0) * s_min_raw)) as f64;
    let sigma_max = 1.0f64; // shift * 1 / (1 + (shift - 1)) = 1
    let ts = linspace(
        sigma_max * n_train as f64,
        sigma_min * n_train as f64,
        steps,
    );
    let sigmas: Vec<f32> = ts
        .iter()
        .map(|t| {
            let s = t / n_train as f64;
            (shift * s / (1.0 + (shift - 1.0) * s)) as f32
        })
        .collect();
    finish(sigmas, n_train)
}

/// FLUX's `mu` from the image sequence length: linear from (256, 0.5) to (4096, 1.15).
pub fn flux_mu(image_seq_len: usize) -> f64 {
    let m = (1.15 - 0.5) / (4096.0 - 256.0);
    let b = 0.5 - m * 256.0;
    image_seq_len as f64 * m + b
}

/// FLUX.2's `compute_empirical_mu` (diffusers' `Flux2KleinPipeline`): `mu` from the image token
/// count and the step count, not from the scheduler config's shifts.
pub fn flux2_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let seq = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * seq + b2;
    }
    let m200 = a2 * seq + b2;
    let m10 = a1 * seq + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

/// FLUX.2's schedule and its `mu`: sigmas `numpy.linspace(1, 1/steps, steps)` (float64) cast to
/// float32, shifted by `e^mu / (e^mu + (1/s - 1))` in float32, a terminal 0 appended.
pub fn flux2_schedule(steps: usize, image_seq_len: usize) -> (FlowSchedule, f64) {
    let mu = flux2_mu(image_seq_len, steps);
    let e = mu.exp() as f32;
    let sigmas = linspace(1.0, 1.0 / steps.max(1) as f64, steps)
        .into_iter()
        .map(|s| {
            let s = s as f32;
            e / (e + (1.0 / s - 1.0))
        })
        .collect();
    (finish(sigmas, 1000), mu)
}

/// What a FLUX pipeline folder's `scheduler/scheduler_config.json` (a
/// `FlowMatchEulerDiscreteScheduler`) sets: dynamic shifting from the image length (FLUX.1-dev:
/// `mu` linear from (`base_image_seq_len`, `base_shift`) to (`max_image_seq_len`, `max_shift`)), or
/// a static `shift` (FLUX.1-schnell: `use_dynamic_shifting = false`, shift 1).
#[derive(Clone, Debug, PartialEq)]
pub struct FluxShift {
    pub dynamic: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_seq: f64,
    pub max_seq: f64,
    pub shift: f64,
    /// `shift_terminal`: the shifted sigmas stretched to end at this value (Qwen-Image: 0.02).
    pub shift_terminal: Option<f64>,
}

impl Default for FluxShift {
    /// FLUX.1-dev's scheduler (what a run without a pipeline folder samples with).
    fn default() -> Self {
        FluxShift {
            dynamic: true,
            base_shift: 0.5,
            max_shift: 1.15,
            base_seq: 256.0,
            max_seq: 4096.0,
            shift: 1.0,
            shift_terminal: None,
        }
    }
}

impl FluxShift {
    /// Reads a FLUX pipeline's `scheduler_config.json`; what this sampler cannot reproduce (another
    /// class, Karras/exponential/beta sigmas, a linear time shift, a terminal shift) is an error
    /// naming the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = magcache_core::error::read_text(path)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&file, "(document)", format!("invalid JSON: {e}")))?;
        let class = v.get("_class_name").and_then(|c| c.as_str());
        if class != Some(EULER_CLASS) {
            return Err(Error::config(
                &file,
                "_class_name",
                format!(
                    "{} is not the scheduler FLUX samples with ({EULER_CLASS})",
                    class.map_or("(missing)".to_string(), |c| format!("`{c}`"))
                ),
            ));
        }
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        ] {
            if v.get(key).and_then(|b| b.as_bool()) == Some(true) {
                return Err(Error::config(
                    &file,
                    key,
                    "true is not supported by this sampler (set it false)",
                ));
            }
        }
        let shift_terminal = match v.get("shift_terminal").filter(|t| !t.is_null()) {
            None => None,
            Some(t) => Some(
                t.as_f64()
                    .filter(|t| t.is_finite() && (0.0..1.0).contains(t))
                    .ok_or_else(|| {
                        Error::config(
                            &file,
                            "shift_terminal",
                            format!("{t} must be a number in [0, 1) or null"),
                        )
                    })?,
            ),
        };
        // diffusers tests `if self.config.shift_terminal:`: 0 means no stretch.
        let shift_terminal = shift_terminal.filter(|t| *t != 0.0);
        match v.get("time_shift_type").and_then(|t| t.as_str()) {
            None | Some("exponential") => {}
            Some(other) => {
                return Err(Error::config(
                    &file,
                    "time_shift_type",
                    format!("`{other}` is not supported (only \"exponential\")"),
                ))
            }
        }
        let d = FluxShift::default();
        let num = |key: &str, default: f64| -> Result<f64> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => x.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    Error::config(&file, key, format!("expected a finite number, got {x}"))
                }),
            }
        };
        let s = FluxShift {
            dynamic: v
                .get("use_dynamic_shifting")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            base_shift: num("base_shift", d.base_shift)?,
            max_shift: num("max_shift", d.max_shift)?,
            base_seq: num("base_image_seq_len", d.base_seq)?,
            max_seq: num("max_image_seq_len", d.max_seq)?,
            shift: num("shift", 1.0)?,
            shift_terminal,
        };
        if s.dynamic && s.base_seq == s.max_seq {
            return Err(Error::config(
                &file,
                "max_image_seq_len",
                "equals base_image_seq_len: mu cannot be interpolated",
            ));
        }
        if !s.dynamic && s.shift <= 0.0 {
            return Err(Error::config(
                &file,
                "shift",
                format!("must be a positive number, got {}", s.shift),
            ));
        }
        Ok(s)
    }

    /// `mu` for `image_seq_len` image tokens (dynamic shifting).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_seq - self.base_seq);
        let b = self.base_shift - m * self.base_seq;
        image_seq_len as f64 * m + b
    }

    /// The schedule of `steps` steps over `image_seq_len` image tokens, and the value that shaped
    /// it (`mu`, or the static shift) for messages.
    pub fn schedule(&self, steps: usize, image_seq_len: usize) -> (FlowSchedule, f64) {
        let (mut s, v) = if self.dynamic {
            let mu = self.mu(image_seq_len);
            (flow_match_dynamic(steps, mu), mu)
        } else {
            // diffusers: `shift * s / (1 + (shift - 1) * s)` over the pipeline's float32 sigmas.
            (flow_match_shifted(steps, self.shift), self.shift)
        };
        if let Some(t) = self.shift_terminal {
            stretch_to_terminal(&mut s, t);
        }
        (s, v)
    }

    /// The shift of a FLUX run: the scheduler config of the pipeline folder its weights are (or lie
    /// in), which must then be readable; FLUX.1-dev's dynamic shift for other runs.
    pub fn for_run(cfg: &magcache_core::RunConfig, base: &Path) -> Result<Self> {
        let Some(w) = cfg
            .model
            .weights
            .as_ref()
            .and_then(|w| w.paths().first().copied())
        else {
            return Ok(FluxShift::default());
        };
        match pipeline_scheduler_config(&crate::config_util::resolve(base, w)) {
            Some(p) => FluxShift::load(&p),
            None => Ok(FluxShift::default()),
        }
    }
}

fn finish(sigmas: Vec<f32>, n_train: usize) -> FlowSchedule {
    let timesteps = sigmas.iter().map(|s| s * n_train as f32).collect();
    let mut sigmas = sigmas;
    sigmas.push(0.0);
    FlowSchedule { timesteps, sigmas }
}

/// The sampler of a static-shift flow-matching loop (Wan).
#[derive(Clone, Debug, PartialEq)]
pub enum FlowSampler {
    /// `FlowMatchEulerDiscreteScheduler` with a static shift ([`flow_match_static`]).
    Euler { shift: f64 },
    /// `UniPCMultistepScheduler` with flow sigmas.
    UniPc(UniPcConfig),
}

impl FlowSampler {
    /// The sampler's name in generation plans and calibration profiles.
    pub fn name(&self) -> &'static str {
        match self {
            FlowSampler::Euler { .. } => "flow-euler",
            FlowSampler::UniPc(_) => "unipc",
        }
    }

    /// The static flow shift.
    pub fn shift(&self) -> f64 {
        match self {
            FlowSampler::Euler { shift } => *shift,
            FlowSampler::UniPc(c) => c.flow_shift,
        }
    }

    /// Where the shift was set, for errors about the schedule: `(file, key)`, the scheduler config's
    /// `flow_shift` when it came from one, else `run_file`'s `sampling.shift`.
    pub fn shift_key(&self, run_file: &str) -> (String, String) {
        match self {
            FlowSampler::UniPc(c) => match &c.flow_shift_from.0 {
                Some(f) => (f.clone(), "flow_shift".into()),
                None => (run_file.to_string(), "sampling.shift".into()),
            },
            FlowSampler::Euler { .. } => (run_file.to_string(), "sampling.shift".into()),
        }
    }

    /// [`FlowSchedule::check`] naming where the shift was set ([`FlowSampler::shift_key`]).
    pub fn check_schedule(&self, schedule: &FlowSchedule, run_file: &str) -> Result<()> {
        let (file, key) = self.shift_key(run_file);
        schedule.check(&file, &key, self.shift())
    }

    /// The schedule of `steps` steps (UniPC: integer timesteps, as floats).
    pub fn schedule(&self, steps: usize) -> Result<FlowSchedule> {
        match self {
            FlowSampler::Euler { shift } => Ok(flow_match_static(steps, *shift)),
            FlowSampler::UniPc(c) => Ok(FlowSchedule::from_unipc(&c.schedule(steps)?)),
        }
    }

    /// A fresh stepper for one generation over `schedule` (as [`FlowSampler::schedule`] made it).
    pub fn stepper(&self, schedule: &FlowSchedule) -> Result<FlowStepper> {
        match self {
            FlowSampler::Euler { .. } => Ok(FlowStepper::Euler(schedule.clone())),
            FlowSampler::UniPc(c) => Ok(FlowStepper::UniPc(Box::new(UniPc::new(
                c,
                schedule.steps(),
            )?))),
        }
    }
}

/// One generation's sampler state.
#[derive(Debug)]
pub enum FlowStepper {
    Euler(FlowSchedule),
    UniPc(Box<UniPc>),
}

impl FlowStepper {
    /// Step `i`: the next latents from the (guided) velocity `pred` at `lat`.
    pub fn step(&mut self, i: usize, pred: &Tensor, lat: &Tensor) -> Result<Tensor> {
        match self {
            FlowStepper::Euler(s) => {
                s.check_lengths()?;
                if i >= s.steps() {
                    return Err(Error::msg(format!(
                        "euler: step {i} requested but the schedule has {} steps",
                        s.steps()
                    )));
                }
                Ok((lat + (pred * s.dt(i) as f64)?)?)
            }
            FlowStepper::UniPc(u) => {
                if u.step_index() != i {
                    return Err(Error::msg(format!(
                        "unipc: step {i} requested but the sampler is at step {}",
                        u.step_index()
                    )));
                }
                u.step(pred, lat)
            }
        }
    }
}

/// `scheduler/scheduler_config.json` of the diffusers pipeline folder that `weights` is or lies in
/// (`PIPELINE` itself, or `PIPELINE/transformer` / `PIPELINE/transformer_2`), if there is one. A
/// pipeline folder (one with `model_index.json`) always has one: its path is returned even when the
/// file is missing or unreadable, so that reading it fails naming it (as a missing `tokenizer/`
/// does) instead of a silent fall-back to Euler.
pub fn pipeline_scheduler_config(weights: &Path) -> Option<PathBuf> {
    let mut roots = vec![weights.to_path_buf()];
    let name = weights.file_name().and_then(|n| n.to_str());
    if matches!(name, Some("transformer" | "transformer_2")) {
        if let Some(parent) = weights.parent() {
            roots.push(parent.to_path_buf());
        }
    }
    roots.into_iter().find_map(|r| {
        let p = r.join("scheduler").join("scheduler_config.json");
        (p.is_file() || r.join("model_index.json").is_file()).then_some(p)
    })
}

/// diffusers' `FlowMatchEulerDiscreteScheduler`, the other scheduler a Wan folder may carry.
pub const EULER_CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// The static `shift` of a `FlowMatchEulerDiscreteScheduler` config (diffusers' default 1.0); its
/// dynamic shifting (FLUX's) is refused for a static-shift (Wan) loop. Errors name the file and key.
pub fn euler_config_shift(path: &Path) -> Result<f64> {
    let file = path.display().to_string();
    let text = magcache_core::error::read_text(path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&file, "(document)", format!("invalid JSON: {e}")))?;
    if v.get("use_dynamic_shifting").and_then(|d| d.as_bool()) == Some(true) {
        return Err(Error::config(
            &file,
            "use_dynamic_shifting",
            "dynamic shifting (FLUX's, from the image length) does not apply to a Wan loop, which shifts statically; set it false and give `shift`, or set [sampling] scheduler and shift",
        ));
    }
    let shift = match v.get("shift") {
        None | Some(serde_json::Value::Null) => 1.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::config(&file, "shift", format!("expected a number, got {x}")))?,
    };
    if !(shift.is_finite() && shift > 0.0) {
        return Err(Error::config(
            &file,
            "shift",
            format!("must be a positive number, got {shift}"),
        ));
    }
    Ok(shift)
}

/// The `_class_name` of a diffusers scheduler config.
pub fn scheduler_class(path: &Path) -> Result<Option<String>> {
    let file = path.display().to_string();
    let text = magcache_core::error::read_text(std::path::Path::new(path))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&file, "(document)", format!("invalid JSON: {e}")))?;
    Ok(v.get("_class_name")
        .and_then(|c| c.as_str())
        .map(String::from))
}

/// How a run chooses its sampler: the `[sampling]` keys `scheduler` and `scheduler_config`.
#[derive(Clone, Debug, Default)]
pub struct SamplerChoice<'a> {
    /// `"euler"`, `"unipc"`, or absent.
    pub scheduler: Option<&'a str>,
    /// An explicit `scheduler_config.json` (UniPC).
    pub scheduler_config: Option<PathBuf>,
    /// The pipeline folder's `scheduler/scheduler_config.json`, if the weights lie in one.
    pub pipeline_config: Option<PathBuf>,
    /// `[sampling] shift`, which overrides a config file's `flow_shift`.
    pub shift: Option<f64>,
    /// The family's shift when neither the run nor a config file gives one.
    pub default_shift: f64,
}

/// Resolves a run's sampler (`file` names the run file in errors):
/// - `scheduler = "euler"`: Euler with `shift` (or the default);
/// - `scheduler = "unipc"`: UniPC from `scheduler_config`, else from the pipeline folder's
///   `scheduler/scheduler_config.json` when that is a UniPC config, else the released Wan
///   configuration; `shift`, when given,
///   replaces the file's `flow_shift`;
/// - absent: UniPC when `scheduler_config` is given or the pipeline folder's scheduler is a
///   `UniPCMultistepScheduler`; Euler at the folder's `shift` when it is a
///   `FlowMatchEulerDiscreteScheduler`; Euler at the default shift for runs without a pipeline
///   folder. A pipeline folder whose scheduler config is missing, unreadable or of another class is
///   an error naming the file (and `_class_name`).
/// - `scheduler = "euler"` over a folder whose scheduler is Euler: the folder's `shift` is the
///   default.
pub fn choose_flow_sampler(choice: &SamplerChoice<'_>, file: &str) -> Result<FlowSampler> {
    let shift = choice.shift.unwrap_or(choice.default_shift);
    let unipc_from = |path: Option<&PathBuf>| -> Result<FlowSampler> {
        let mut c = match path {
            Some(p) => UniPcConfig::load(p)?,
            None => UniPcConfig::wan(shift),
        };
        if let Some(s) = choice.shift {
            c.flow_shift = s;
            c.flow_shift_from = crate::unipc::ShiftOrigin(None);
        }
        Ok(FlowSampler::UniPc(c))
    };
    match choice.scheduler {
        Some("euler") => {
            if choice.scheduler_config.is_some() {
                return Err(Error::config(
                    file,
                    "sampling.scheduler_config",
                    "is read by scheduler = \"unipc\" only; remove it or choose unipc",
                ));
            }
            // A folder whose scheduler is Euler gives the default shift.
            let shift = match (&choice.shift, &choice.pipeline_config) {
                (None, Some(p))
                    if p.is_file() && scheduler_class(p)?.as_deref() == Some(EULER_CLASS) =>
                {
                    euler_config_shift(p)?
                }
                _ => shift,
            };
            Ok(FlowSampler::Euler { shift })
        }
        Some("unipc") => match (&choice.scheduler_config, &choice.pipeline_config) {
            (Some(p), _) => unipc_from(Some(p)),
            (None, Some(p)) if scheduler_class(p)?.as_deref() == Some(UNIPC_CLASS) => {
                unipc_from(Some(p))
            }
            _ => unipc_from(None),
        },
        Some(other) => Err(Error::config(
            file,
            "sampling.scheduler",
            format!("unknown scheduler `{other}` (known: \"euler\", \"unipc\")"),
        )),
        None => {
            if let Some(p) = &choice.scheduler_config {
                return unipc_from(Some(p));
            }
            match &choice.pipeline_config {
                Some(p) => match scheduler_class(p)?.as_deref() {
                    Some(UNIPC_CLASS) => unipc_from(Some(p)),
                    // The folder's shift is the default: the run's `shift` overrides it.
                    Some(EULER_CLASS) => Ok(FlowSampler::Euler {
                        shift: match choice.shift {
                            Some(s) => s,
                            None => euler_config_shift(p)?,
                        },
                    }),
                    other => Err(Error::config(
                        p.display().to_string(),
                        "_class_name",
                        format!(
                            "{} is not a scheduler a Wan run has ({UNIPC_CLASS}, {EULER_CLASS}); set [sampling] scheduler = \"unipc\" or \"euler\" to choose one",
                            other.map_or("(missing)".to_string(), |c| format!("`{c}`"))
                        ),
                    )),
                },
                None => Ok(FlowSampler::Euler { shift }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_shift_ends() {
        let s = flow_match_static(12, 5.0);
        assert_eq!(s.timesteps[0], 1000.0);
        assert!((s.timesteps[11] - 24.414066).abs() < 1e-3);
        assert_eq!(s.sigmas.len(), 13);
        assert_eq!(s.sigmas[12], 0.0);
    }
}
