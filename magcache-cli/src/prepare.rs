//! From a run file to a pipeline and its cache, ready to generate.

use magcache_core::runtime::registry;
use magcache_core::{BuildEnv, CacheHandle, Error, Pipeline, Result, RunConfig};
use std::path::{Path, PathBuf};

/// Keeps the strategies' registrations linked in (they are part of the runner). Model families are
/// not: a binary links its own (`magcache_models::link()` in the `magcache` binary).
pub(crate) fn link_strategies() {
    magcache_strategies::link();
}

/// A run file, its pipeline and its cache, ready to generate.
pub struct Prepared {
    pub cfg: RunConfig,
    pub file: String,
    pub pipeline: Box<dyn Pipeline>,
    pub cache: Option<CacheHandle>,
    pub strategy: String,
    /// Lines for the report's warnings from preparing the run (how `dtype = "auto"` resolved when
    /// it fell back to bf16).
    pub notes: Vec<String>,
}

impl Prepared {
    /// Attaches `cache` (none: the run is dense) to the pipeline, named `strategy` in reports.
    pub fn use_cache(&mut self, cache: Option<CacheHandle>, strategy: &str) -> Result<()> {
        self.pipeline.set_cache(cache.clone())?;
        (self.cache, self.strategy) = (cache, strategy.to_string());
        Ok(())
    }
}

/// `dtype = "auto"` by the family's per-stage estimate ([`registry::EstimateRun`]): `f32` when
/// every stage fits the available memory in f32, else `bf16` and the note naming the stage that
/// does not fit. `None` when the family gives no estimate.
pub(crate) fn auto_dtype_by_estimate(
    cfg: &mut RunConfig,
    file: &str,
    base: &Path,
    fam: &registry::ModelFamily,
) -> Result<Option<(String, Option<String>)>> {
    let Some(estimate) = fam.estimate else {
        return Ok(None);
    };
    let avail = magcache_core::runtime::guard::available_memory()?;
    // The estimate in f32; `cfg` keeps its own dtype.
    let saved = std::mem::replace(&mut cfg.model.dtype, "f32".into());
    let stages = estimate(cfg, file, base);
    cfg.model.dtype = saved;
    let gb = magcache_core::runtime::guard::gb;
    for (stage, fp) in stages? {
        if fp.check_against(file, &avail).is_err() {
            let big = fp
                .largest()
                .map(|p| format!(", {} {}", p.what, gb(p.bytes)))
                .unwrap_or_default();
            return Ok(Some((
                "bf16".into(),
                Some(format!(
                    "{file}: model.dtype = \"auto\" chose bf16: in f32 the `{stage}` stage would need about {}{big}, more than the {} available ({}); set model.dtype to choose",
                    gb(fp.total()),
                    gb(avail.bytes),
                    avail.source
                )),
            )));
        }
    }
    Ok(Some(("f32".into(), None)))
}

/// A note for a bf16 run on a CPU with AMX and no oneDNN named (`nn::onednn::amx_hint`).
fn bf16_hint(cfg: &RunConfig) {
    let cpu = cfg.model.device == "cpu";
    if cpu && cfg.model.dtype == "bf16" && magcache_core::runtime::progress::visible() {
        if let Some(h) = magcache_layers::nn::onednn::amx_hint() {
            eprintln!("note: {h}");
        }
    }
}

/// Builds the family's pipeline, with `model.dtype = "auto"` resolved in `cfg`: `f32` when the size
/// guard lets the run build in f32 (every stage's estimate fits), otherwise `bf16`, with a note
/// saying why. The guard refuses before a stage loads anything, so the f32 attempt costs only the
/// stages that did fit before the one that did not (a Wan text encoder may run twice).
fn build_resolved(
    cfg: &mut RunConfig,
    file: &str,
    base: &Path,
    fam: &registry::ModelFamily,
) -> Result<(Box<dyn Pipeline>, Vec<String>)> {
    // The library `MAGCACHE_ONEDNN` names opens before anything loads (a bad name stops here).
    if let Some(d) = magcache_layers::nn::onednn::check()? {
        if magcache_core::runtime::progress::visible() {
            eprintln!("note: linear products on {d}");
        }
    }
    if !cfg.is_auto_dtype() {
        bf16_hint(cfg);
        return Ok(((fam.build)(cfg, file, base)?, Vec::new()));
    }
    let (pipeline, note) = match auto_dtype_by_estimate(cfg, file, base, fam)? {
        Some((dtype, note)) => {
            cfg.model.dtype = dtype;
            ((fam.build)(cfg, file, base)?, note)
        }
        // No per-stage estimate: try f32, and bf16 when the guard refuses it.
        None => {
            cfg.model.dtype = "f32".into();
            match (fam.build)(cfg, file, base) {
                Err(Error::TooLarge { msg, .. }) => {
                    cfg.model.dtype = "bf16".into();
                    let note = format!(
                        "{file}: model.dtype = \"auto\" chose bf16: in f32 {msg} (set model.dtype to choose)"
                    );
                    ((fam.build)(cfg, file, base)?, Some(note))
                }
                r => (r?, None),
            }
        }
    };
    if let Some(n) = &note {
        if magcache_core::runtime::progress::visible() {
            eprintln!("note: {n}");
        }
    }
    bf16_hint(cfg);
    Ok((pipeline, note.into_iter().collect()))
}

/// Loads and validates a run file and builds the pipeline, without a cache.
pub fn prepare_pipeline(config: &Path) -> Result<Prepared> {
    link_strategies();
    let mut cfg = RunConfig::load(config)?;
    let file = config.display().to_string();
    let base = base_dir(config);
    let fam = family_of(&cfg, &file)?;
    let (pipeline, notes) = build_resolved(&mut cfg, &file, &base, fam)?;
    Ok(Prepared {
        cfg,
        file,
        pipeline,
        cache: None,
        strategy: "none".into(),
        notes,
    })
}

/// As [`prepare_pipeline`], from a run file's `text` standing for `config` (paths relative to its
/// folder).
pub(crate) fn prepare_pipeline_text(text: &str, config: &Path) -> Result<Prepared> {
    link_strategies();
    let (mut cfg, file, base, fam) = resolve_text(text, config)?;
    let (pipeline, notes) = build_resolved(&mut cfg, &file, &base, fam)?;
    Ok(Prepared {
        cfg,
        file,
        pipeline,
        cache: None,
        strategy: "none".into(),
        notes,
    })
}

/// Loads and validates a run file and builds the pipeline and the cache.
pub fn prepare(config: &Path) -> Result<Prepared> {
    let mut p = prepare_pipeline(config)?;
    attach_cache(&mut p, &base_dir(config))?;
    Ok(p)
}

/// Builds the run's strategy (`[cache]`) for the prepared pipeline and attaches it.
pub(crate) fn attach_cache(p: &mut Prepared, base: &Path) -> Result<()> {
    let info = p.pipeline.model_info();
    let env = BuildEnv {
        file: &p.file,
        base_dir: base,
        model: &info,
    };
    let strategy_cfg = p.cfg.strategy();
    let cache = strategy_cfg.build(&env)?.map(CacheHandle::new);
    p.use_cache(cache, strategy_cfg.typetag_name())
}

pub(crate) fn base_dir(config: &Path) -> PathBuf {
    config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A run file's text as a run is built from it: parsed and validated, its hub ids resolved to the
/// local cache's snapshots, and its family found and its keys checked; with the file's name and
/// folder.
pub(crate) fn resolve_text(
    text: &str,
    config: &Path,
) -> Result<(RunConfig, String, PathBuf, &'static registry::ModelFamily)> {
    let file = config.display().to_string();
    let base = base_dir(config);
    let mut cfg = RunConfig::parse(text, &file)?;
    cfg.validate(&file)?;
    cfg.resolve_hub_ids(&file, &base, &magcache_core::runtime::hub::cache_root())?;
    let fam = family_of(&cfg, &file)?;
    Ok((cfg, file, base, fam))
}

/// Whether an error's message is a strategy's about one of its keys, found once the model runs
/// (`cache.downsample (..) is not below ..`, `dbcache: cache.front_blocks ..`): it names the key
/// in its text, not as a config error.
pub(crate) fn names_cache_key(msg: &str) -> bool {
    msg.starts_with("cache.") || msg.contains(": cache.")
}

pub(crate) fn family_of(cfg: &RunConfig, file: &str) -> Result<&'static registry::ModelFamily> {
    let family = known_family(cfg, file)?;
    family.check_keys(cfg, file)?;
    family.check_files(cfg, file, &base_dir(Path::new(file)))?;
    let offload = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?;
    if offload == magcache_core::Offload::Stream && !family.streams {
        let streaming: Vec<&str> = registry::families()
            .iter()
            .filter(|f| f.streams)
            .map(|f| f.name)
            .collect();
        return Err(Error::config(
            file,
            "model.offload",
            format!(
                "family `{}` does not stream its blocks (families that do: {}); use offload = \"none\"",
                family.name,
                streaming.join(", ")
            ),
        ));
    }
    Ok(family)
}

fn known_family(cfg: &RunConfig, file: &str) -> Result<&'static registry::ModelFamily> {
    registry::family(&cfg.model.family).ok_or_else(|| {
        let known: Vec<&str> = registry::families().iter().map(|f| f.name).collect();
        Error::config(
            file,
            "model.family",
            format!(
                "unknown family `{}` (known: {})",
                cfg.model.family,
                known.join(", ")
            ),
        )
    })
}

/// The run file's relative paths that name something beside it, as `(key, path)`: `inputs.file`,
/// `model.config`, adapters, the family's own files and `model.weights` (a hub id names nothing
/// there). A run file written into another folder would not find them.
pub(crate) fn relative_paths(config: &Path) -> Result<Vec<(String, String)>> {
    let cfg = RunConfig::load(config)?;
    let base = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut named = cfg.named_files();
    if let Some(fam) = registry::family(&cfg.model.family) {
        named.extend(fam.files_in(&cfg));
    }
    if let Some(w) = &cfg.model.weights {
        named.extend(
            w.paths()
                .into_iter()
                .map(|p| ("model.weights".into(), p.to_string())),
        );
    }
    Ok(named
        .into_iter()
        .filter(|(_, p)| Path::new(p).is_relative() && base.join(p).symlink_metadata().is_ok())
        .collect())
}

/// The tuned run file keeps the run file's text: refused (before any run) when it goes to another
/// folder and that text names files by relative paths, which would not resolve from there.
pub(crate) fn refuse_moved_paths(config: &Path, out: &Path) -> Result<()> {
    let folder = |p: &Path| {
        let d = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::canonicalize(d).ok()
    };
    if folder(config) == folder(out) {
        return Ok(());
    }
    let rel = relative_paths(config)?;
    if let Some((key, p)) = rel.first() {
        return Err(Error::config(
            config.display().to_string(),
            key,
            format!(
                "`{p}` is relative to the run file's folder, and --out {} is in another folder, where the tuned run file would not find it: write --out beside the run file, or make the path absolute",
                out.display()
            ),
        ));
    }
    Ok(())
}

/// The run file's text without its `[cache]` table.
pub(crate) fn without_cache(text: &str) -> String {
    let out = without_cache_tables(text);
    // A `cache` the line edit cannot see (an inline table, a dotted key at the root, a quoted
    // header): the parsed document without it (its comments and layout are lost, its keys kept).
    let left = out.parse::<toml::Table>();
    if left.as_ref().is_ok_and(|t| !t.contains_key("cache")) {
        return out;
    }
    match text.parse::<toml::Table>() {
        Ok(mut doc) => {
            doc.remove("cache");
            toml::to_string(&doc).unwrap_or(out)
        }
        Err(_) => out,
    }
}

/// `text` without its `[cache]` table and subtables, line by line (comments and layout kept).
fn without_cache_tables(text: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            // `[cache]` and its subtables (`[cache.mag_ratios]`, `[[cache.x]]`).
            let name = t.trim_start_matches('[');
            let name = name.split(']').next().unwrap_or("").trim();
            skipping = name == "cache" || name.starts_with("cache.");
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cache_table_goes_however_it_is_spelt() {
        let rest = "[model]\nfamily = \"wan2.1\"\n[sampling]\nsteps = 4\n";
        for cache in [
            "[cache]\nstrategy = \"none\"\n[cache.mag_ratios]\nmain = [1.0]\n",
            "['cache']\nstrategy = \"none\"\n",
        ] {
            let text = format!("{rest}{cache}");
            let out: toml::Table = super::without_cache(&text).parse().unwrap();
            assert!(
                !out.contains_key("cache") && out.contains_key("sampling"),
                "{cache}"
            );
        }
        // At the root: an inline table, a dotted key.
        for cache in [
            "cache = { strategy = \"none\" }\n",
            "cache.strategy = \"none\"\n",
        ] {
            let text = format!("{cache}{rest}");
            let out: toml::Table = super::without_cache(&text).parse().unwrap();
            assert!(
                !out.contains_key("cache") && out.contains_key("model"),
                "{cache}"
            );
        }
        // The plain form keeps the file's comments.
        let text = format!("# mine\n{rest}[cache]\nstrategy = \"none\"\n");
        assert!(super::without_cache(&text).starts_with("# mine\n"));
    }
}
