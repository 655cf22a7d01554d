//! Wall time spent on the CPU in the linear layers and in the attention, summed over the process:
//! `magcache run --json` reports the denoising loop's share as `cpu_time`, so that a call's time
//! splits into its products (linear layers and attention) and the rest (norms, modulation, RoPE,
//! residual adds, the activations' conversions), the figure that says which to speed up on a CPU
//! (docs/benchmarks.md). Where layers run on several threads at once the sums are thread time; the
//! models run one layer at a time, each over all the threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static LINEAR_NS: AtomicU64 = AtomicU64::new(0);
static ATTENTION_NS: AtomicU64 = AtomicU64::new(0);

/// Seconds spent so far in the CPU's linear layers and attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CpuTime {
    /// The linear layers: the product, its bias and any conversion of the activations for it.
    pub linear_seconds: f64,
    /// The attention: `QK^T`, softmax and `PV` (the projections are linear layers).
    pub attention_seconds: f64,
}

impl CpuTime {
    /// The time spent between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            linear_seconds: self.linear_seconds - earlier.linear_seconds,
            attention_seconds: self.attention_seconds - earlier.attention_seconds,
        }
    }
}

/// The totals so far.
pub fn cpu_time() -> CpuTime {
    let s = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 * 1e-9;
    CpuTime {
        linear_seconds: s(&LINEAR_NS),
        attention_seconds: s(&ATTENTION_NS),
    }
}

/// Adds its lifetime to a total when dropped (on every return path); off for GPU tensors, whose
/// work is asynchronous.
pub(super) struct Timer(Option<(Instant, &'static AtomicU64)>);

impl Timer {
    fn start(cpu: bool, total: &'static AtomicU64) -> Timer {
        Timer(cpu.then(|| (Instant::now(), total)))
    }

    pub(super) fn linear(cpu: bool) -> Timer {
        Timer::start(cpu, &LINEAR_NS)
    }

    pub(super) fn attention(cpu: bool) -> Timer {
        Timer::start(cpu, &ATTENTION_NS)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((t, total)) = self.0 {
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            total.fetch_add(ns, Ordering::Relaxed);
        }
    }
}
