//! The size guard: before a model builds weights, loads a checkpoint or draws inputs, it adds up what
//! the run will hold in memory (a [`Footprint`] of named parts, each tied to the config key that
//! drives it) and [`Footprint::check`] refuses the run when the total exceeds the available memory.
//!
//! Available memory is, in order:
//! 1. the `MAGCACHE_MEMORY_LIMIT` environment variable ([`MEMORY_LIMIT_ENV`]): bytes, or a number
//!    with a `K`, `M`, `G` or `T` suffix (powers of 1024; `24G`, `512M`, `1.5T`), or `none` to
//!    switch the guard off;
//! 2. on Linux, 90% of `MemAvailable` in `/proc/meminfo` (the estimate counts tensors only);
//! 3. elsewhere (or when `/proc/meminfo` cannot be read), a fixed ceiling of 1 TiB
//!    ([`FALLBACK_LIMIT`]): absurd sizes are still refused at once, real ones are not checked.
//!
//! Every size is computed with checked arithmetic: an overflow counts as "more than any memory".
//! Host memory only: the memory of a CUDA or Metal device is not checked.

use crate::error::{Error, Result};

/// The environment variable that sets the memory the guard compares with (see the module docs).
pub const MEMORY_LIMIT_ENV: &str = "MAGCACHE_MEMORY_LIMIT";

/// The limit used where the available memory cannot be read (1 TiB).
pub const FALLBACK_LIMIT: u64 = 1 << 40;

/// Bytes of the plan and report per transformer call (the plan's per-step sigmas and indices, the
/// call list, one report entry and its JSON), for the `sampling.steps` part of a footprint.
pub const BYTES_PER_CALL: u64 = 1024;

/// The memory a run may use and where that number came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Available {
    /// `None`: unlimited (`MAGCACHE_MEMORY_LIMIT=none`).
    pub bytes: Option<u64>,
    /// Where the number came from, for messages.
    pub source: String,
}

/// Parses a size: plain bytes, or a number with a `K`/`M`/`G`/`T` suffix (optionally followed by `B`
/// or `iB`), in powers of 1024.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let units = [('K', 10u32), ('M', 20), ('G', 30), ('T', 40)];
    let (num, mult) = units
        .iter()
        .find_map(|&(c, shift)| {
            t.strip_suffix(c)
                .or_else(|| t.strip_suffix(c.to_ascii_lowercase()))
                .map(|n| (n, 1u64 << shift))
        })
        .unwrap_or((t, 1));
    let x: f64 = num.trim().parse().ok()?;
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    let bytes = x * mult as f64;
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The memory available to a run (see the module docs for the order of sources).
pub fn available_memory() -> Result<Available> {
    if let Ok(v) = std::env::var(MEMORY_LIMIT_ENV) {
        if v.trim().eq_ignore_ascii_case("none") {
            return Ok(Available {
                bytes: None,
                source: format!("{MEMORY_LIMIT_ENV}=none"),
            });
        }
        let bytes = parse_size(&v).ok_or_else(|| {
            Error::config(
                "environment",
                MEMORY_LIMIT_ENV,
                format!("`{v}` is not a size (bytes, or a number with K, M, G or T, or `none`)"),
            )
        })?;
        return Ok(Available {
            bytes: Some(bytes),
            source: format!("{MEMORY_LIMIT_ENV}={}", v.trim()),
        });
    }
    if let Some(b) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t))
    {
        // The estimate counts tensors only: keep a tenth for the process itself, the allocator's
        // slack and the rest of the system (a bf16 FLUX.1-dev, 23.8 GB of weights, passed a bare
        // 24.7 GB MemAvailable and then exhausted the machine).
        return Ok(Available {
            bytes: Some(b / 10 * 9),
            source: format!(
                "90% of MemAvailable in /proc/meminfo; set {MEMORY_LIMIT_ENV} to change"
            ),
        });
    }
    Ok(Available {
        bytes: Some(FALLBACK_LIMIT),
        source: format!(
            "available memory unknown on this system, 1 TiB assumed; set {MEMORY_LIMIT_ENV}"
        ),
    })
}

/// `MemAvailable:  123456 kB` -> bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Checked product of sizes; `None` on overflow.
pub fn product(xs: &[usize]) -> Option<u64> {
    xs.iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(u64::try_from(x).ok()?))
}

/// Checked sum; `None` on overflow or when any term is `None`.
pub fn sum(xs: &[Option<u64>]) -> Option<u64> {
    xs.iter().try_fold(0u64, |acc, &x| acc.checked_add(x?))
}

/// One part of a footprint: what it is, the config key that drives it, and its size (`None`: the
/// arithmetic overflowed, more than any memory).
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub what: String,
    pub knob: String,
    pub bytes: Option<u64>,
    /// The part is already the streamed (smallest resident) form of the weights: a refusal then
    /// does not suggest streaming.
    pub streamed: bool,
    /// What a refusal whose largest part this is tells the user to do, when more than "make the
    /// knob smaller" (e.g. a switch that bounds the part).
    pub advice: Option<String>,
}

/// What a run will hold in memory, part by part.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Footprint {
    pub parts: Vec<Part>,
}

/// `bytes` in GB (10^9 bytes), for messages.
pub fn gb(bytes: Option<u64>) -> String {
    match bytes {
        // Under 0.1 GB in MB, where one decimal of a GB would read 0.0.
        Some(b) if b < 100_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        Some(b) => format!("{:.1} GB", b as f64 / 1e9),
        None => "over 18 EB (the size overflows)".to_string(),
    }
}

impl Footprint {
    /// Adds a part: `what` (e.g. "weights"), driven by config key `knob`, of `bytes`.
    pub fn add(&mut self, what: impl Into<String>, knob: impl Into<String>, bytes: Option<u64>) {
        self.parts.push(Part {
            what: what.into(),
            knob: knob.into(),
            bytes,
            streamed: false,
            advice: None,
        });
    }

    /// Sets what a refusal tells the user to do when the last part added is the largest.
    pub fn advise(&mut self, advice: impl Into<String>) {
        if let Some(p) = self.parts.last_mut() {
            p.advice = Some(advice.into());
        }
    }

    /// Adds the weights a streamed model keeps resident (`model.offload = "stream"`).
    pub fn add_streamed(
        &mut self,
        what: impl Into<String>,
        knob: impl Into<String>,
        bytes: Option<u64>,
    ) {
        self.add(what, knob, bytes);
        if let Some(p) = self.parts.last_mut() {
            p.streamed = true;
        }
    }

    /// The total; `None` on overflow.
    pub fn total(&self) -> Option<u64> {
        sum(&self.parts.iter().map(|p| p.bytes).collect::<Vec<_>>())
    }

    /// The largest part (an overflowing part counts as the largest).
    pub fn largest(&self) -> Option<&Part> {
        self.parts
            .iter()
            .max_by_key(|p| p.bytes.map_or((1, 0), |b| (0, b)))
    }

    /// Refuses the run when the footprint exceeds the available memory ([`available_memory`]).
    pub fn check(&self, file: &str) -> Result<()> {
        self.check_against(file, &available_memory()?)
    }

    /// Refuses the run when the footprint exceeds `avail`: one line naming `file`, the key of the
    /// largest part, the estimate in GB part by part, and the available memory and its source.
    pub fn check_against(&self, file: &str, avail: &Available) -> Result<()> {
        let total = self.total();
        let fits = match (total, avail.bytes) {
            (_, None) => true,
            (Some(t), Some(a)) => t <= a,
            (None, Some(_)) => false,
        };
        if fits {
            return Ok(());
        }
        let Some(big) = self.largest() else {
            return Ok(());
        };
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{} {} [{}]", p.what, gb(p.bytes), p.knob))
            .collect();
        Err(Error::TooLarge {
            file: file.to_string(),
            key: big.knob.clone(),
            msg: format!(
                "the run would need {}{} ({}) but {} is available ({}); {}",
                if total.is_some() { "about " } else { "" },
                gb(total),
                parts.join(", "),
                gb(avail.bytes),
                avail.source,
                match big.knob.as_str() {
                    _ if big.advice.is_some() => big.advice.clone().unwrap_or_default(),
                    "model.weights" if big.streamed => "use a 2-byte model.dtype or a smaller checkpoint".to_string(),
                    "model.preset" => "use a 2-byte model.dtype, a smaller preset or [model.overrides], or write it with `magcache export` and run it with model.offload = \"stream\"".to_string(),
                    "model.weights" => "use model.offload = \"stream\" (blocks read from the checkpoint as they run), a 2-byte model.dtype or a smaller checkpoint".to_string(),
                    k => format!("make {k} smaller"),
                }
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("2K"), Some(2048));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("24GiB"), Some(24 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1e30T"), None);
        assert_eq!(
            mem_available("MemTotal: 10 kB\nMemAvailable:   2 kB\n"),
            Some(2048)
        );
    }

    #[test]
    fn refusal_names_the_largest_part_and_overflow_never_panics() {
        let avail = Available {
            bytes: Some(1 << 30),
            source: "test".into(),
        };
        let mut f = Footprint::default();
        f.add("weights", "model.preset", Some(10));
        f.add("activations", "inputs.latent_shape", Some(2 << 30));
        let e = f.check_against("run.toml", &avail).unwrap_err().to_string();
        assert!(e.starts_with("run.toml: inputs.latent_shape: "), "{e}");
        assert!(e.contains("2.1 GB"), "{e}");
        f.add("plan", "sampling.steps", product(&[usize::MAX, 3]));
        let e = f.check_against("run.toml", &avail).unwrap_err().to_string();
        assert!(e.contains("run.toml: sampling.steps: "), "{e}");
        assert_eq!(sum(&[Some(u64::MAX), Some(1)]), None);
        let small = Footprint {
            parts: vec![Part {
                what: "w".into(),
                knob: "k".into(),
                bytes: Some(5),
                streamed: false,
                advice: None,
            }],
        };
        assert!(small.check_against("f", &avail).is_ok());
        // A part with its own advice says it.
        let mut t = Footprint::default();
        t.add("cache", "vae.tiling", Some(2 << 30));
        t.advise("set tiling = true in [vae]");
        let e = t.check_against("run.toml", &avail).unwrap_err().to_string();
        assert!(
            e.starts_with("run.toml: vae.tiling: ") && e.ends_with("; set tiling = true in [vae]"),
            "{e}"
        );
        let unlimited = Available {
            bytes: None,
            source: "none".into(),
        };
        assert!(f.check_against("f", &unlimited).is_ok());
        // A checkpoint too big to hold points at streaming it.
        let mut w = Footprint::default();
        w.add("weights", "model.weights", Some(2 << 30));
        let e = w.check_against("run.toml", &avail).unwrap_err().to_string();
        assert!(e.starts_with("run.toml: model.weights: "), "{e}");
        assert!(e.contains("model.offload = \"stream\""), "{e}");
        // One already streamed does not.
        let mut w = Footprint::default();
        w.add_streamed(
            "streamed weights (embeddings, head, two blocks)",
            "model.weights",
            Some(2 << 30),
        );
        let e = w.check_against("run.toml", &avail).unwrap_err().to_string();
        assert!(
            e.contains("2-byte model.dtype") && !e.contains("offload"),
            "{e}"
        );
    }
}
