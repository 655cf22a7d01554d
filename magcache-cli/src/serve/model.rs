//! One served model: its run file, kept warm by a worker thread that runs its jobs one at a time
//! (off the async threads), each job a request's keys laid over the run file and run exactly as
//! `magcache run` runs it.

use super::metrics::Metrics;
use crate::prepare::{attach_cache, prepare_pipeline_text, Prepared};
use magcache_core::denoise::{CallEvent, Observer};
use magcache_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::oneshot;

/// What a request may set besides the run file (OpenAI's names, and the run file's `[cache]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    pub model: String,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub response_format: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub num_inference_steps: Option<u64>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// Replaces the run file's `[cache]` table.
    #[serde(default)]
    pub cache: Option<toml::Table>,
}

/// The cache's figures for one picture (the `magcache` entries of a response).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Figures {
    pub seed: u64,
    pub calls: usize,
    pub computed: usize,
    pub strategy: String,
    pub wall_s: f64,
    pub prompt_cached: bool,
}

/// One generated picture (PNG) or video (MP4) and its figures.
pub(crate) struct Picture {
    pub bytes: Vec<u8>,
    pub figures: Figures,
}

/// A job for a model's worker.
pub(crate) struct Job {
    /// The request's run file text (the run file with the request's keys).
    pub text: String,
    pub seeds: Vec<u64>,
    pub cancel: Arc<AtomicBool>,
    /// A video job: its progress (0-100), and the frame rate it is written at.
    pub video: Option<(Arc<AtomicU8>, u32)>,
    pub reply: oneshot::Sender<Result<Vec<Picture>>>,
}

/// A served model.
pub(crate) struct Served {
    pub id: String,
    pub path: PathBuf,
    /// The run file's text as read at start.
    pub text: String,
    pub family: String,
    /// The run's own seed (`inputs.seed`, else `model.seed`): a request without `seed` uses it.
    pub seed: u64,
    /// Video models: the frame rate their videos are written at.
    pub fps: Option<u32>,
    queue: SyncSender<Job>,
    pub depth: Arc<AtomicUsize>,
}

impl Served {
    /// Reads `path`, builds its pipeline once (the size guard first: a model that cannot fit is
    /// refused here, naming the file), and starts its worker.
    pub fn start(
        path: &Path,
        id: Option<String>,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Served> {
        let text = magcache_core::error::read_text(path)?;
        let warm = match with_prompt(&text, path)? {
            None => prepare(&text, path)?,
            // Built as its requests will be: a run a prompt cannot apply to fails here, once.
            Some(prompted) => prepare(&prompted, path).map_err(|e| not_servable(path, e))?,
        };
        let family = warm.cfg.model.family.clone();
        let seed = warm.cfg.inputs.seed.unwrap_or(warm.cfg.model.seed);
        let fps = warm.pipeline.frame_rate();
        drop(warm);
        let id = id.unwrap_or_else(|| super::stem(path));
        let (tx, rx) = sync_channel::<Job>(max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let (p, d) = (path.to_path_buf(), depth.clone());
        std::thread::Builder::new()
            .name(format!("magcache-{id}"))
            .spawn(move || work(&p, rx, &d, &metrics))
            .map_err(|e| Error::msg(format!("{}: cannot start its worker: {e}", path.display())))?;
        Ok(Served {
            id,
            path: path.to_path_buf(),
            text,
            family,
            seed,
            fps,
            queue: tx,
            depth,
        })
    }

    /// Queues a job; `false` when the queue is full (nothing accepted is dropped).
    pub fn submit(&self, job: Job) -> bool {
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                false
            }
        }
    }
}

/// A run file without `[prompt]`: its text with a placeholder prompt, as every request will set
/// one (`prepare` checks it as a run file before anything loads); `None` when it has a `[prompt]`
/// table.
fn with_prompt(text: &str, path: &Path) -> Result<Option<String>> {
    let file = path.display().to_string();
    let mut doc: toml::Table = toml::from_str(text)
        .map_err(|e| Error::config(&file, "(document)", e.message().to_string()))?;
    if doc.contains_key("prompt") {
        return Ok(None);
    }
    let mut prompt = toml::Table::new();
    prompt.insert("text".into(), "a prompt".into());
    doc.insert("prompt".into(), toml::Value::Table(prompt));
    toml::to_string(&doc)
        .map(Some)
        .map_err(|e| Error::msg(format!("{file}: {e}")))
}

/// A run file a request's prompt cannot apply to (a run on latent inputs, a transformer folder
/// without text encoder): refused at start, since every request to it would fail.
fn not_servable(path: &Path, e: Error) -> Error {
    Error::msg(format!(
        "serve: {} cannot be served: each request sets [prompt] text, and with one: {e} (serve needs a prompted run: docs/serve.md)",
        path.display()
    ))
}

/// Parses, validates and builds a run from its text, with its cache, as `magcache run` does.
fn prepare(text: &str, path: &Path) -> Result<Prepared> {
    let mut p = prepare_pipeline_text(text, path)?;
    attach_cache(&mut p, &crate::prepare::base_dir(path))?;
    Ok(p)
}

/// Whether `RUST_LOG` (`error`, `warn`, `info` (the default), `debug`) lets lines of `level` out.
pub(crate) fn logs(level: &str) -> bool {
    let rank = |l: &str| match l {
        "error" => 0,
        "warn" => 1,
        "debug" | "trace" => 3,
        _ => 2,
    };
    let set = std::env::var("RUST_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let set = set
        .rsplit(['=', ','])
        .next()
        .unwrap_or("info")
        .trim()
        .to_string();
    rank(level) <= rank(if set.is_empty() { "info" } else { &set })
}

fn work(path: &Path, rx: Receiver<Job>, depth: &AtomicUsize, metrics: &Metrics) {
    let name = path.display().to_string();
    for job in rx {
        let start = std::time::Instant::now();
        let what = match job.video {
            Some(_) => "a video".to_string(),
            None => format!("{} picture(s)", job.seeds.len()),
        };
        if logs("info") {
            eprintln!("serve: {name}: {what} started");
        }
        // The text encoders' layers and the VAE's blocks, tiles and frames check the flag too
        // (`magcache_core::cancel`): a cancelled job does not finish its decode.
        let scope = magcache_core::cancel::Scope::enter(job.cancel.clone());
        // A panic in a job is its error: the worker, its queue and `depth` (which a shutdown
        // waits on) live on.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if job.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            job.seeds
                .iter()
                .map(|&s| picture(path, &job, s, metrics))
                .collect::<Result<Vec<_>>>()
        }));
        let out = match run {
            // A stage that wraps the error it got (`VAE: decode: cancelled`) ended for the flag.
            Err(_) | Ok(Err(_)) if scope.tripped() => Err(Error::Cancelled),
            Ok(out) => out,
            Err(_) => Err(Error::msg(format!(
                "{name}: the job panicked (the server goes on; the log above says where)"
            ))),
        };
        drop(scope);
        depth.fetch_sub(1, Ordering::SeqCst);
        if logs("info") {
            let t = start.elapsed().as_secs_f64();
            match &out {
                Ok(_) => eprintln!("serve: {name}: {what} done in {t:.1} s"),
                Err(e) => eprintln!("serve: {name}: {what} ended after {t:.1} s: {e}"),
            }
        }
        let _ = job.reply.send(out);
    }
}

/// Counts the calls, reports the steps done and passes the cancel flag to the generation.
struct Watch<'a> {
    calls: usize,
    computed: usize,
    cancel: &'a AtomicBool,
    progress: Option<&'a AtomicU8>,
    /// Step lines on stderr (`RUST_LOG=debug`).
    log: bool,
}

impl Observer for Watch<'_> {
    fn call(&mut self, ev: &CallEvent) {
        self.calls += 1;
        if ev.decision.is_none_or(|d| d.computed) {
            self.computed += 1;
        }
    }
    fn step(&mut self, done: usize, total: usize) {
        if self.log {
            eprintln!("serve: step {done}/{total}");
        }
        if let Some(p) = self.progress {
            // The decode after the loop is the last 5%.
            p.store((done * 95 / total.max(1)) as u8, Ordering::SeqCst);
        }
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// One picture (or video) of a job: the run file text with `inputs.seed = seed`, built (weights
/// and prompt from the warm caches), generated and decoded as `magcache run --png` (`--video`)
/// does.
fn picture(path: &Path, job: &Job, seed: u64, metrics: &Metrics) -> Result<Picture> {
    let start = std::time::Instant::now();
    magcache_core::cancel::check()?;
    if let Some((progress, _)) = &job.video {
        progress.store(1, Ordering::SeqCst);
    }
    let text = with_seed(&job.text, seed, path)?;
    let hits = magcache_layers::weights::warm::prompt_hits();
    let mut p = prepare(&text, path)?;
    let prompt_cached = magcache_layers::weights::warm::prompt_hits() > hits;
    let mut watch = Watch {
        calls: 0,
        computed: 0,
        cancel: &job.cancel,
        progress: job.video.as_ref().map(|v| &*v.0),
        log: logs("debug"),
    };
    let latents = p.pipeline.generate(&mut watch)?;
    magcache_core::cancel::check()?;
    p.pipeline.release_models();
    let decoded = p.pipeline.finish(&latents)?.ok_or_else(|| {
        Error::msg(format!(
            "{}: the run decodes no picture (a [prompt] run of a pipeline folder is needed)",
            path.display()
        ))
    })?;
    let frames = crate::video::Frames::from_decoded(&decoded.pixels)?;
    let bytes = match &job.video {
        Some((progress, fps)) => {
            let mp4 = frames.mp4(*fps)?;
            progress.store(100, Ordering::SeqCst);
            mp4
        }
        None => frames.first_png()?,
    };
    let wall_s = start.elapsed().as_secs_f64();
    metrics.generated(watch.calls, watch.computed, prompt_cached, wall_s);
    Ok(Picture {
        bytes,
        figures: Figures {
            seed,
            calls: watch.calls,
            computed: watch.computed,
            strategy: p.strategy.clone(),
            wall_s,
            prompt_cached,
        },
    })
}

/// The run file text with `[inputs] seed` set.
fn with_seed(text: &str, seed: u64, path: &Path) -> Result<String> {
    let mut doc: toml::Table = toml::from_str(text)
        .map_err(|e| Error::config(path.display().to_string(), "(document)", e.to_string()))?;
    let inputs = doc
        .entry("inputs")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(t) = inputs.as_table_mut() {
        t.insert("seed".into(), toml::Value::Integer(seed_value(seed)?));
    }
    toml::to_string(&doc).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
}

/// A seed as TOML holds it (a signed 64-bit integer).
pub(crate) fn seed_value(seed: u64) -> Result<i64> {
    i64::try_from(seed).map_err(|_| Error::config("request", "seed", "must be at most 2^63 - 1"))
}
