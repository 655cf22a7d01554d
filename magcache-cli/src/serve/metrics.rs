//! The server's counters, written as Prometheus text (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the generation-time histogram's buckets.
const BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Default)]
struct Counts {
    requests: BTreeMap<(String, u16), u64>,
    computed: u64,
    reused: u64,
    prompt_hits: u64,
    /// Per bucket (and +Inf last), cumulative when written.
    seconds: Vec<u64>,
    seconds_sum: f64,
    seconds_count: u64,
}

#[derive(Default)]
pub(crate) struct Metrics {
    counts: Mutex<Counts>,
}

impl Metrics {
    /// One answered request.
    pub fn request(&self, route: &str, status: u16) {
        if let Ok(mut c) = self.counts.lock() {
            *c.requests.entry((route.to_string(), status)).or_default() += 1;
        }
    }

    /// One generated picture or video.
    pub fn generated(&self, calls: usize, computed: usize, prompt_cached: bool, seconds: f64) {
        if let Ok(mut c) = self.counts.lock() {
            c.computed += computed as u64;
            c.reused += calls.saturating_sub(computed) as u64;
            c.prompt_hits += u64::from(prompt_cached);
            if c.seconds.is_empty() {
                c.seconds = vec![0; BUCKETS.len() + 1];
            }
            let i = BUCKETS
                .iter()
                .position(|&b| seconds <= b)
                .unwrap_or(BUCKETS.len());
            c.seconds[i] += 1;
            c.seconds_sum += seconds;
            c.seconds_count += 1;
        }
    }

    /// Prometheus' text format; `queue` the jobs waiting or running now.
    pub fn text(&self, queue: usize) -> String {
        let Ok(c) = self.counts.lock() else {
            return String::new();
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP magcache_requests_total Requests answered, by route and status."
        );
        let _ = writeln!(s, "# TYPE magcache_requests_total counter");
        for ((route, status), n) in &c.requests {
            let _ = writeln!(
                s,
                "magcache_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(s, "# HELP magcache_queue_depth Jobs queued or running.");
        let _ = writeln!(s, "# TYPE magcache_queue_depth gauge");
        let _ = writeln!(s, "magcache_queue_depth {queue}");
        let _ = writeln!(s, "# HELP magcache_transformer_calls_total Transformer calls, computed or reused from the cache.");
        let _ = writeln!(s, "# TYPE magcache_transformer_calls_total counter");
        let _ = writeln!(
            s,
            "magcache_transformer_calls_total{{kind=\"computed\"}} {}",
            c.computed
        );
        let _ = writeln!(
            s,
            "magcache_transformer_calls_total{{kind=\"reused\"}} {}",
            c.reused
        );
        let _ = writeln!(s, "# HELP magcache_prompt_cache_hits_total Generations whose prompt embeddings were kept.");
        let _ = writeln!(s, "# TYPE magcache_prompt_cache_hits_total counter");
        let _ = writeln!(s, "magcache_prompt_cache_hits_total {}", c.prompt_hits);
        let _ = writeln!(
            s,
            "# HELP magcache_generation_seconds Wall time of one generation (build, loop, decode)."
        );
        let _ = writeln!(s, "# TYPE magcache_generation_seconds histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += c.seconds.get(i).copied().unwrap_or(0);
            let _ = writeln!(s, "magcache_generation_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(
            s,
            "magcache_generation_seconds_bucket{{le=\"+Inf\"}} {}",
            c.seconds_count
        );
        let _ = writeln!(s, "magcache_generation_seconds_sum {}", c.seconds_sum);
        let _ = writeln!(s, "magcache_generation_seconds_count {}", c.seconds_count);
        s
    }
}
