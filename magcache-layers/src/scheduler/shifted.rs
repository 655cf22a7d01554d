//! The linspaces flow-matching schedules start from (numpy's, and torch's float32 `linspace(1, 1/N,
//! N)`), shifted dynamically (FLUX, `mu`) or statically (Z-Image: the pipeline passes these sigmas
//! and the scheduler's static shift applies to them), and the stretch to a terminal sigma
//! (Qwen-Image).

use super::{finish, FlowSchedule};

/// torch's float32 `linspace`: the first half counts up from `start`, the second half down from
/// `end`, both with `step = (end - start) / (n - 1)`.
fn linspace_f32_torch(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => return vec![],
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// Dynamic shift (FLUX): sigmas `linspace(1, 1/steps, steps)` (float32, as torch), shifted by
/// `e^mu / (e^mu + (1/s - 1))` in float32 (as numpy does on a float32 array).
pub fn flow_match_dynamic(steps: usize, mu: f64) -> FlowSchedule {
    let base = linspace_f32_torch(1.0, 1.0 / steps as f32, steps);
    let e = mu.exp() as f32;
    let sigmas: Vec<f32> = base.iter().map(|&s| e / (e + (1.0 / s - 1.0))).collect();
    finish(sigmas, 1000)
}

/// Static shift on the pipeline's sigmas (Z-Image): `linspace(1, 1/N, N)` in float32, then
/// `shift * s / (1 + (shift - 1) * s)` in float32.
pub fn flow_match_shifted(steps: usize, shift: f64) -> FlowSchedule {
    let s = shift as f32;
    let sigmas = linspace_f32_torch(1.0, 1.0 / steps as f32, steps)
        .into_iter()
        .map(|x| s * x / (1.0 + (s - 1.0) * x))
        .collect();
    finish(sigmas, 1000)
}

/// diffusers' `stretch_shift_to_terminal` (float32): `1 - s` scaled so the last sigma before the
/// final 0 is `terminal`; the timesteps follow.
pub(super) fn stretch_to_terminal(s: &mut FlowSchedule, terminal: f64) {
    let n = s.timesteps.len();
    let Some(&last) = n.checked_sub(1).and_then(|i| s.sigmas.get(i)) else {
        return;
    };
    let k = (1.0 - last) / (1.0 - terminal as f32);
    for (i, sig) in s.sigmas.iter_mut().take(n).enumerate() {
        *sig = 1.0 - (1.0 - *sig) / k;
        s.timesteps[i] = *sig * 1000.0;
    }
}

/// numpy's `linspace(start, stop, n)`: `start + i * step`, with the last entry exactly `stop`.
pub(super) fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = stop;
            v
        }
    }
}
