//! UniPC multistep sampling for flow-prediction models (diffusers `UniPCMultistepScheduler` with
//! `prediction_type = "flow_prediction"`, `use_flow_sigmas = true`, `predict_x0 = true`): the
//! schedule, read from a diffusers `scheduler_config.json`, and a stateful stepper with the UniP
//! predictor and the UniC corrector (solver types `bh1` / `bh2`, any solver order,
//! `lower_order_final`, `disable_corrector`, `final_sigmas_type` `zero` / `sigma_min`).
//!
//! Precision follows diffusers: the schedule is computed in f64 (numpy) and stored as f32; every
//! coefficient of a step (alphas, lambdas, `h`, `expm1`, the small linear solves) and every tensor
//! operation is f32.

use candle_core::{DType, Tensor};
use magcache_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::Path;

/// The class name a diffusers `scheduler_config.json` of this scheduler carries.
pub const UNIPC_CLASS: &str = "UniPCMultistepScheduler";

/// `solver_type`: the `B(h)` of the UniPC update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    /// `B(h) = -h` (with data prediction)
    Bh1,
    /// `B(h) = expm1(-h)`
    Bh2,
}

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmas {
    /// 0: the last step lands on the data prediction.
    Zero,
    /// The last step's own sigma (the last step then leaves the sample unchanged).
    SigmaMin,
}

/// The settings of a flow-prediction UniPC scheduler. Only supported configurations can be built:
/// [`UniPcConfig::from_json`] rejects the others with an error naming the file and the key.
#[derive(Clone, Debug, PartialEq)]
pub struct UniPcConfig {
    pub num_train_timesteps: usize,
    pub solver_order: usize,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    /// Steps whose following corrector is skipped (diffusers: the corrector at step k runs unless
    /// `k - 1` is listed).
    pub disable_corrector: Vec<usize>,
    /// Static flow shift: `sigma' = shift sigma / (1 + (shift - 1) sigma)`.
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigmas,
    /// The file `flow_shift` was read from, for messages (`None`: the run file's `sampling.shift`
    /// or a default). Not part of a comparison of two configs.
    pub flow_shift_from: ShiftOrigin,
}

/// The file a scheduler config's `flow_shift` came from (errors about the schedule name it, not the
/// run file). Two origins always compare equal: configs are compared by what they compute.
#[derive(Clone, Debug, Default)]
pub struct ShiftOrigin(pub Option<String>);

impl PartialEq for ShiftOrigin {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl UniPcConfig {
    /// The configuration of the released Wan2.1 / Wan2.2 pipelines (`scheduler/scheduler_config.json`
    /// of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) with the given flow shift.
    pub fn wan(flow_shift: f64) -> Self {
        UniPcConfig {
            num_train_timesteps: 1000,
            solver_order: 2,
            solver_type: SolverType::Bh2,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            flow_shift,
            final_sigmas_type: FinalSigmas::Zero,
            flow_shift_from: ShiftOrigin(None),
        }
    }

    /// Reads and checks a diffusers `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = magcache_core::error::read_text(std::path::Path::new(path))?;
        Self::from_json_str(&text, &file)
    }

    /// Parses the text of a `scheduler_config.json`; `file` names it in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(file, "(document)", format!("invalid JSON: {e}")))?;
        Self::from_json(&v, file)
    }

    /// Reads the fields of a diffusers `UniPCMultistepScheduler` config (absent or null fields take
    /// diffusers' defaults; unknown fields are ignored) and rejects the settings this implementation
    /// does not support.
    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        let m = v
            .as_object()
            .ok_or_else(|| Error::config(file, "(document)", "expected a JSON object"))?;
        let unsupported =
            |key: &str, msg: String| Err(Error::config(file, key, format!("not supported: {msg}")));
        if let Some(class) = field::<String>(m, "_class_name", file)? {
            if class != UNIPC_CLASS {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("is `{class}`; expected `{UNIPC_CLASS}`"),
                ));
            }
        }
        let prediction =
            field::<String>(m, "prediction_type", file)?.unwrap_or_else(|| "epsilon".into());
        if prediction != "flow_prediction" {
            return unsupported(
                "prediction_type",
                format!("`{prediction}` (only \"flow_prediction\" models are supported)"),
            );
        }
        if !field::<bool>(m, "use_flow_sigmas", file)?.unwrap_or(false) {
            return unsupported(
                "use_flow_sigmas",
                "false (flow prediction needs use_flow_sigmas = true)".into(),
            );
        }
        if !field::<bool>(m, "predict_x0", file)?.unwrap_or(true) {
            return unsupported(
                "predict_x0",
                "false (only the data-prediction form, predict_x0 = true)".into(),
            );
        }
        for key in [
            "thresholding",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_dynamic_shifting",
        ] {
            if field::<bool>(m, key, file)?.unwrap_or(false) {
                return unsupported(key, "true (only false)".into());
            }
        }
        for key in ["solver_p", "sigma_min", "sigma_max", "shift_terminal"] {
            if let Some(v) = m.get(key).filter(|v| !v.is_null()) {
                return unsupported(key, format!("{v} (only null)"));
            }
        }
        let solver_type = match field::<String>(m, "solver_type", file)?.as_deref() {
            None | Some("bh2") => SolverType::Bh2,
            Some("bh1") => SolverType::Bh1,
            Some(other) => {
                return unsupported("solver_type", format!("`{other}` (only \"bh1\", \"bh2\")"))
            }
        };
        let final_sigmas_type = match field::<String>(m, "final_sigmas_type", file)?.as_deref() {
            None | Some("zero") => FinalSigmas::Zero,
            Some("sigma_min") => FinalSigmas::SigmaMin,
            Some(other) => {
                return unsupported(
                    "final_sigmas_type",
                    format!("`{other}` (only \"zero\", \"sigma_min\")"),
                )
            }
        };
        let cfg = UniPcConfig {
            num_train_timesteps: field(m, "num_train_timesteps", file)?.unwrap_or(1000),
            solver_order: field(m, "solver_order", file)?.unwrap_or(2),
            solver_type,
            lower_order_final: field(m, "lower_order_final", file)?.unwrap_or(true),
            disable_corrector: field(m, "disable_corrector", file)?.unwrap_or_default(),
            flow_shift: field(m, "flow_shift", file)?.unwrap_or(1.0),
            final_sigmas_type,
            flow_shift_from: ShiftOrigin(Some(file.to_string())),
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Range checks; errors name `file` and the key.
    pub fn validate(&self, file: &str) -> Result<()> {
        if self.num_train_timesteps == 0 {
            return Err(Error::config(
                file,
                "num_train_timesteps",
                "must be at least 1",
            ));
        }
        if self.solver_order == 0 {
            return Err(Error::config(file, "solver_order", "must be at least 1"));
        }
        if !(self.flow_shift.is_finite() && self.flow_shift > 0.0) {
            return Err(Error::config(
                file,
                "flow_shift",
                format!("must be a positive number, got {}", self.flow_shift),
            ));
        }
        if self.solver_order > 1
            && !self.lower_order_final
            && self.final_sigmas_type == FinalSigmas::Zero
        {
            return Err(Error::config(
                file,
                "lower_order_final",
                "false with final_sigmas_type \"zero\" is not supported: a multistep update onto sigma 0 divides by zero (diffusers returns infinities); set lower_order_final = true",
            ));
        }
        Ok(())
    }

    /// The schedule of `steps` steps (diffusers `set_timesteps` with `use_flow_sigmas`), in float64
    /// then cast: `s = linspace(1, 1/T, steps + 1)[:steps]`, `sigma = shift s / (1 + (shift - 1) s)`,
    /// the first sigma moved to `1 - 1e-6` when it is within 1e-6 of 1, integer timesteps
    /// `trunc(sigma * T)`, and the final sigma appended.
    pub fn schedule(&self, steps: usize) -> Result<UniPcSchedule> {
        if steps == 0 {
            return Err(Error::msg("unipc: a schedule needs at least 1 step"));
        }
        let n_train = self.num_train_timesteps as f64;
        let shift = self.flow_shift;
        let base = linspace(1.0, 1.0 / n_train, steps + 1);
        let mut sig: Vec<f64> = base[..steps]
            .iter()
            .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        if let Some(s0) = sig.first_mut() {
            if (*s0 - 1.0).abs() < 1e-6 {
                *s0 -= 1e-6;
            }
        }
        let timesteps: Vec<i64> = sig.iter().map(|&s| (s * n_train) as i64).collect();
        let last = match self.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sig[steps - 1],
        };
        let sigmas = sig
            .iter()
            .chain(std::iter::once(&last))
            .map(|&s| s as f32)
            .collect();
        Ok(UniPcSchedule { timesteps, sigmas })
    }
}

/// A UniPC schedule: the integer timestep the model receives at each step and the sigmas (one per
/// step plus the final one).
#[derive(Clone, Debug, PartialEq)]
pub struct UniPcSchedule {
    pub timesteps: Vec<i64>,
    pub sigmas: Vec<f32>,
}

impl UniPcSchedule {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }
}

/// numpy's `linspace(start, stop, n)` (float64): `start + i * step`, the last entry exactly `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// Field `key` of a config object as `T`; `None` when absent or null.
fn field<T: DeserializeOwned>(m: &Map<String, Value>, key: &str, file: &str) -> Result<Option<T>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| Error::config(file, key, format!("{e} (got {v})"))),
    }
}

/// `alpha = 1 - sigma`, `lambda = log(alpha) - log(sigma)` (+inf at sigma 0), in f32.
fn alpha_lambda(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 - sigma;
    (alpha, alpha.ln() - sigma.ln())
}

/// Solves the small system `a x = b` in f32 by Gaussian elimination with partial pivoting (what
/// `torch.linalg.solve` does through LAPACK).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        let mut piv = col;
        for r in col + 1..n {
            if a[r][col].abs() > a[piv][col].abs() {
                piv = r;
            }
        }
        if a[piv][col] == 0.0 || !a[piv][col].is_finite() {
            return Err(Error::msg(
                "unipc: singular coefficient system (repeated sigmas in the schedule?)",
            ));
        }
        a.swap(col, piv);
        b.swap(col, piv);
        let pivot_row = a[col].clone();
        let pivot_b = b[col];
        for r in col + 1..n {
            let f = a[r][col] / pivot_row[col];
            for (x, p) in a[r].iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
            b[r] -= f * pivot_b;
        }
    }
    let mut x = vec![0f32; n];
    for r in (0..n).rev() {
        let mut s = b[r];
        for c in r + 1..n {
            s -= a[r][c] * x[c];
        }
        x[r] = s / a[r][r];
    }
    Ok(x)
}

/// The coefficients shared by the predictor and the corrector of one update from sigma `s0` to
/// `t`: `h`, `hh = -h`, `h phi_1 = expm1(hh)`, `B(h)`, and the right-hand side `b` of the order
/// conditions (`order` entries).
struct Coeffs {
    h: f32,
    h_phi_1: f32,
    b_h: f32,
    b: Vec<f32>,
}

fn coeffs(lambda_t: f32, lambda_s0: f32, order: usize, solver: SolverType) -> Coeffs {
    let h = lambda_t - lambda_s0;
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match solver {
        SolverType::Bh1 => hh,
        SolverType::Bh2 => hh.exp_m1(),
    };
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1u64;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial as f32 / b_h);
        factorial *= i as u64 + 1;
        h_phi_k = h_phi_k / hh - 1.0 / factorial as f32;
    }
    Coeffs { h, h_phi_1, b_h, b }
}

/// `R` of the order conditions: row `i` holds `rks^i` (`rks` ends with 1).
fn r_matrix(rks: &[f32]) -> Vec<Vec<f32>> {
    (0..rks.len())
        .map(|i| rks.iter().map(|r| r.powi(i as i32)).collect())
        .collect()
}

fn scale(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `t / d` as a true division (as torch divides by a 0-dim tensor).
fn div(t: &Tensor, d: f32) -> Result<Tensor> {
    let d = Tensor::new(d, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&d)?)
}

/// `sum_j rhos[j] * ds[j]`.
fn weighted_sum(rhos: &[f32], ds: &[Tensor]) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (r, d) in rhos.iter().zip(ds) {
        let term = scale(d, *r)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    Ok(acc)
}

/// A UniPC sampler over one generation: call [`UniPc::step`] once per step with the model output
/// (the guided velocity) at the current sample; it returns the next sample. It keeps the last
/// `solver_order` data predictions and the corrected sample of the previous step.
#[derive(Debug)]
pub struct UniPc {
    cfg: UniPcConfig,
    schedule: UniPcSchedule,
    step_index: usize,
    /// Data predictions `m` of the last steps, oldest first (at most `solver_order`).
    history: Vec<Tensor>,
    /// The sample the previous predictor started from (after UniC).
    last_sample: Option<Tensor>,
    /// Order of the previous predictor (the order of the next corrector).
    this_order: usize,
    lower_order_nums: usize,
}

impl UniPc {
    /// A sampler of `steps` steps.
    pub fn new(cfg: &UniPcConfig, steps: usize) -> Result<Self> {
        cfg.validate("unipc config")?;
        let schedule = cfg.schedule(steps)?;
        Ok(UniPc {
            cfg: cfg.clone(),
            schedule,
            step_index: 0,
            history: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.cfg
    }

    pub fn schedule(&self) -> &UniPcSchedule {
        &self.schedule
    }

    pub fn steps(&self) -> usize {
        self.schedule.steps()
    }

    /// The step the next [`UniPc::step`] call performs.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// The integer timestep the model receives at the next step (`None` after the last step).
    pub fn timestep(&self) -> Option<i64> {
        self.schedule.timesteps.get(self.step_index).copied()
    }

    /// The sample the last predictor started from: after step k, `x_k` corrected by UniC
    /// (diffusers' `last_sample`; the sample itself at step 0).
    pub fn last_sample(&self) -> Option<&Tensor> {
        self.last_sample.as_ref()
    }

    /// Order of the last predictor.
    pub fn last_order(&self) -> usize {
        self.this_order
    }

    /// One step: `model_output` is the flow prediction `v` at `sample` (the current `x_k`); returns
    /// `x_{k+1}`, in `sample`'s dtype (the maths run in f32).
    pub fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let k = self.step_index;
        let n = self.steps();
        if k >= n {
            return Err(Error::msg(format!(
                "unipc: step {k} requested but the schedule has {n} steps"
            )));
        }
        if model_output.dims() != sample.dims() {
            return Err(Error::msg(format!(
                "unipc: model output has shape {:?} but the sample has {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        let dtype = sample.dtype();
        let v = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        // Data prediction (flow): x0 = x - sigma v.
        let m = (&x - scale(&v, self.schedule.sigmas[k])?)?;
        let use_corrector = k > 0 && !self.cfg.disable_corrector.contains(&(k - 1));
        let x = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(last, &m)?,
            _ => x,
        };
        self.history.push(m);
        if self.history.len() > self.cfg.solver_order {
            self.history.remove(0);
        }
        let cap = if self.cfg.lower_order_final {
            self.cfg.solver_order.min(n - k)
        } else {
            self.cfg.solver_order
        };
        self.this_order = cap.min(self.lower_order_nums + 1);
        let prev = self.predict(&x, self.this_order)?;
        self.last_sample = Some(x);
        if self.lower_order_nums < self.cfg.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev.to_dtype(dtype)?)
    }

    /// The data prediction `offset` steps back in the history (0 = the newest).
    fn past(&self, offset: usize) -> Result<&Tensor> {
        self.history
            .len()
            .checked_sub(offset + 1)
            .and_then(|i| self.history.get(i))
            .ok_or_else(|| Error::msg("unipc: history shorter than the solver order"))
    }

    /// UniC at step k (k >= 1): corrects `x_k` from the corrected `x_{k-1}` (`last`), the history
    /// (newest = `m_{k-1}`) and the new data prediction `m_t = m_k`, with the order of the previous
    /// predictor.
    fn correct(&self, last: &Tensor, m_t: &Tensor) -> Result<Tensor> {
        let k = self.step_index;
        let order = self.this_order.max(1);
        let sig = &self.schedule.sigmas;
        let (alpha_t, lambda_t) = alpha_lambda(sig[k]);
        let (_, lambda_s0) = alpha_lambda(sig[k - 1]);
        let (sigma_t, sigma_s0) = (sig[k], sig[k - 1]);
        let c = coeffs(lambda_t, lambda_s0, order, self.cfg.solver_type);
        let m0 = self.past(0)?;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for i in 1..order {
            let si = k
                .checked_sub(i + 1)
                .ok_or_else(|| Error::msg("unipc: corrector order exceeds the steps taken"))?;
            let (_, lambda_si) = alpha_lambda(sig[si]);
            let rk = (lambda_si - lambda_s0) / c.h;
            rks.push(rk);
            d1s.push(div(&(self.past(i)? - m0)?, rk)?);
        }
        rks.push(1.0);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(r_matrix(&rks), c.b.clone())?
        };
        let base = (scale(last, sigma_t / sigma_s0)? - scale(m0, alpha_t * c.h_phi_1)?)?;
        let d1_t = (m_t - m0)?;
        let last_rho = rhos.last().copied().unwrap_or(0.5);
        let mut res = scale(&d1_t, last_rho)?;
        if let Some(corr) = weighted_sum(&rhos[..rhos.len() - 1], &d1s)? {
            res = (corr + res)?;
        }
        Ok((base - scale(&res, alpha_t * c.b_h)?)?)
    }

    /// UniP of `order` from `x` (the corrected `x_k`; the history's newest entry is `m_k`) to
    /// sigma `k + 1`.
    fn predict(&self, x: &Tensor, order: usize) -> Result<Tensor> {
        let k = self.step_index;
        let sig = &self.schedule.sigmas;
        let (alpha_t, lambda_t) = alpha_lambda(sig[k + 1]);
        let (_, lambda_s0) = alpha_lambda(sig[k]);
        let (sigma_t, sigma_s0) = (sig[k + 1], sig[k]);
        let c = coeffs(lambda_t, lambda_s0, order, self.cfg.solver_type);
        let m0 = self.past(0)?;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for i in 1..order {
            let si = k
                .checked_sub(i)
                .ok_or_else(|| Error::msg("unipc: predictor order exceeds the steps taken"))?;
            let (_, lambda_si) = alpha_lambda(sig[si]);
            let rk = (lambda_si - lambda_s0) / c.h;
            rks.push(rk);
            d1s.push(div(&(self.past(i)? - m0)?, rk)?);
        }
        rks.push(1.0);
        let base = (scale(x, sigma_t / sigma_s0)? - scale(m0, alpha_t * c.h_phi_1)?)?;
        if d1s.is_empty() {
            return Ok(base);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            let r = r_matrix(&rks);
            let r: Vec<Vec<f32>> = r[..order - 1]
                .iter()
                .map(|row| row[..order - 1].to_vec())
                .collect();
            solve(r, c.b[..order - 1].to_vec())?
        };
        match weighted_sum(&rhos, &d1s)? {
            Some(res) => Ok((base - scale(&res, alpha_t * c.b_h)?)?),
            None => Ok(base),
        }
    }
}

#[cfg(test)]
#[path = "unipc_tests.rs"]
mod tests;
