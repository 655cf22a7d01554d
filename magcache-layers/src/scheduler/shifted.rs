//! Flow-matching schedules on torch's float32 `linspace(1, 1/N, N)`, shifted dynamically (FLUX,
//! `mu`) or statically (Z-Image: the pipeline passes these sigmas and the scheduler's static shift
//! applies to them).

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
