//! Writing output files safely.
//!
//! Every output a command will write is checked before any work ([`Outputs::plan`]): it must be
//! absent or a regular file (never a folder, a device, a FIFO, a socket or a symbolic link), it must
//! not be one of the run's inputs however a path reaches it (config, inputs file, every file of the
//! weights folders, the shards an index names, the scheduler config, profiles, ...: compared by
//! device and inode, see [`magcache_core::files`]) nor another output of the same command, and its
//! folder must exist and be writable. Planning creates an empty temporary file beside the target
//! (proving the folder writable) under a short name (`.magcache-PID-K.tmp`, so that any legal output
//! name works); results are written into the temporaries ([`Outputs::write`]) and
//! [`Outputs::commit`] checks every target again (against every file the run read, too) and then
//! renames them all into place, keeping a hard link to each file it replaces until all renames
//! succeeded: a failure while committing puts back what was there. Until then nothing the user owns
//! changes; temporaries are removed when the command fails, is dropped, or is interrupted (SIGINT,
//! SIGTERM, SIGHUP: [`crate::temps::install_signal_cleanup`], which also undoes a commit under way); ones left by
//! a killed process (SIGKILL) are named in a warning by the next command that writes into the same
//! folder, never removed (see [`crate::temps`]). Temporaries and backups are created new
//! (`create_new`, or a hard link): nothing already there is ever written over. A new output's
//! permissions follow the umask; a replaced file's mode (its permission bits) is kept, and a file
//! with no write bit is not replaced.

mod kinds;
use crate::temps::{clean_stale, cleanup_state, register, roll_back, temp_name, unregister, Undo};
use candle_core::Tensor;
use kinds::not_replaceable;
use magcache_core::files::{file_id, FileId};
use magcache_core::{Error, Result, RunConfig};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A file the command reads, with what it is (for messages).
#[derive(Clone, Debug)]
struct InputFile {
    id: FileId,
    path: PathBuf,
    what: String,
}

/// A folder the command reads from.
#[derive(Clone, Debug)]
struct InputDir {
    canonical: PathBuf,
    path: PathBuf,
    what: String,
}

struct Planned {
    flag: String,
    target: PathBuf,
    /// The target with its folder canonicalised (the identity used for clash checks).
    canonical: PathBuf,
    tmp: PathBuf,
    written: bool,
}

/// The outputs of one command: checked up front, written to temporaries, committed together.
#[derive(Default)]
pub struct Outputs {
    files: Vec<InputFile>,
    dirs: Vec<InputDir>,
    planned: Vec<Planned>,
}

/// `path` with symlinks and `..` resolved as far as it exists: the file itself when it exists, else
/// its folder plus the name.
fn identity(path: &Path) -> Option<PathBuf> {
    if let Ok(c) = path.canonicalize() {
        return Some(c);
    }
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    dir.canonicalize().ok().map(|d| d.join(name))
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// How deep, and over how many entries, an input folder is walked for its files (a pipeline folder
/// is 3 levels and a few dozen files; the files a run actually reads are checked at commit in any
/// case).
const WALK_DEPTH: usize = 8;
const WALK_ENTRIES: usize = 100_000;
/// Largest `*.index.json` read for the shards it names.
const INDEX_BYTES: u64 = 256 << 20;

/// `path (which resolves to REAL)`, or `path` when it is its own canonical path.
fn shown_resolved(path: &Path) -> String {
    match path.canonicalize() {
        Ok(c) if c != path => format!("{}, which resolves to {}", path.display(), c.display()),
        _ => path.display().to_string(),
    }
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a file or folder the command reads: a folder with every file in it (following
    /// symlinks: a Hugging Face snapshot's files are links into its `blobs/`), a `*.index.json`
    /// with the shards it names (`../` included).
    pub fn input(&mut self, path: &Path, what: &str) {
        let mut seen = HashSet::new();
        let mut budget = WALK_ENTRIES;
        self.add_input(path, what, WALK_DEPTH, &mut seen, &mut budget);
    }

    fn add_input(
        &mut self,
        path: &Path,
        what: &str,
        depth: usize,
        seen: &mut HashSet<FileId>,
        budget: &mut usize,
    ) {
        let Ok(m) = std::fs::metadata(path) else {
            return;
        };
        let id = magcache_core::files::file_id_of(path, &m);
        if !seen.insert(id.clone()) {
            return;
        }
        if m.is_dir() {
            if let Ok(c) = path.canonicalize() {
                self.dirs.push(InputDir {
                    canonical: c,
                    path: path.to_path_buf(),
                    what: what.to_string(),
                });
            }
            if depth == 0 {
                return;
            }
            let Ok(rd) = std::fs::read_dir(path) else {
                return;
            };
            let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                if *budget == 0 {
                    return;
                }
                *budget -= 1;
                self.add_input(&e, what, depth - 1, seen, budget);
            }
            return;
        }
        self.files.push(InputFile {
            id,
            path: path.to_path_buf(),
            what: what.to_string(),
        });
        if m.is_file() && m.len() <= INDEX_BYTES && path.to_string_lossy().ends_with(".index.json")
        {
            for shard in index_shards(path) {
                self.add_input(&shard, what, 0, seen, budget);
            }
        }
    }

    /// Registers every file a run config reads: the config itself, `inputs.file`, `model.weights`
    /// (files, or folders with everything in them; the pipeline folder around a `transformer/`),
    /// `model.config`, `sampling.scheduler_config`, and the strategy's files.
    pub fn run_inputs(&mut self, config: &Path) -> Result<()> {
        self.input(config, "the run's config file");
        let cfg = RunConfig::load(config)?;
        let base = config
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Some(f) = &cfg.inputs.file {
            self.input(&resolve(base, f), "the run's inputs file (inputs.file)");
        }
        if let Some(c) = &cfg.model.config {
            self.input(&resolve(base, c), "the model config (model.config)");
        }
        for l in &cfg.model.lora {
            self.input(&resolve(base, &l.path), "a LoRA adapter (model.lora)");
        }
        // Files the family's own keys name (Wan's `sampling.scheduler_config`).
        if let Some(fam) = magcache_core::runtime::registry::family(&cfg.model.family) {
            for (key, path) in fam.files_in(&cfg) {
                self.input(
                    &resolve(base, &path),
                    &format!("a file the run reads ({key})"),
                );
            }
        }
        if let Some(w) = &cfg.model.weights {
            for p in w.paths() {
                let path = resolve(base, p);
                if path.is_file() {
                    // Side files read from beside a weights file.
                    if let Some(dir) = path.parent() {
                        for side in ["config.json", "class_embeddings.safetensors"] {
                            self.input(&dir.join(side), "a file read beside the weights");
                        }
                    }
                }
                // A transformer folder of a pipeline: the pipeline's scheduler and index are read.
                let name = path.file_name().and_then(|n| n.to_str());
                if matches!(name, Some("transformer" | "transformer_2")) {
                    if let Some(root) = path.parent() {
                        for side in ["model_index.json", "scheduler"] {
                            self.input(&root.join(side), "a file of the weights' pipeline folder");
                        }
                    }
                }
                self.input(&path, "the model weights (model.weights)");
            }
        }
        for (key, p) in cfg.strategy().input_files() {
            self.input(&resolve(base, &p), &format!("an input of the run ({key})"));
        }
        Ok(())
    }

    /// The input `target` is (by identity), among the registered inputs and every file the process
    /// has read so far.
    fn input_of(&self, target: &Path) -> Option<(String, PathBuf)> {
        let id = file_id(target)?;
        if let Some(i) = self.files.iter().find(|i| i.id == id) {
            return Some((i.what.clone(), i.path.clone()));
        }
        magcache_core::files::read_as(&id).map(|r| ("a file this run read".to_string(), r.path))
    }

    /// Checks that `path` may be replaced: absent or a regular file, not an input.
    fn check_target(&self, flag: &str, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let err = |why: String| Error::io(&shown, format!("{flag}: {why}"));
        if let Some((what, input)) = self.input_of(path) {
            return Err(err(format!(
                "is {what} ({}); refusing to overwrite it",
                shown_resolved(&input)
            )));
        }
        match not_replaceable(path) {
            Some(why) => Err(err(why)),
            None => Ok(()),
        }
    }

    /// Checks an output before any work and creates its (empty) temporary. `flag` names it in
    /// messages (`--out`, `--report`, ...).
    pub fn plan(&mut self, flag: &str, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let err = |why: String| Error::io(&shown, format!("{flag}: {why}"));
        // `out.png/` names a folder to the system (the rename at the end would fail), though
        // `file_name` drops the slash.
        let trailing = path
            .as_os_str()
            .to_string_lossy()
            .ends_with(['/', std::path::MAIN_SEPARATOR]);
        if path.file_name().is_none() || trailing {
            return Err(err(if path.is_dir() {
                "is a folder; give a file path"
            } else {
                "not a file path (it ends with a separator)"
            }
            .into()));
        }
        self.check_target(flag, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(err(format!("{} is not a folder", dir.display()))),
            Err(e) => {
                return Err(err(format!(
                    "the output folder {} cannot be used: {e}",
                    dir.display()
                )))
            }
        }
        let canonical = identity(path).ok_or_else(|| err("cannot resolve the path".into()))?;
        if canonical.exists() {
            if let Some(i) = self
                .dirs
                .iter()
                .find(|i| canonical.starts_with(&i.canonical))
            {
                return Err(err(format!(
                    "is a file inside {} ({}); refusing to overwrite it",
                    i.what,
                    shown_resolved(&i.path)
                )));
            }
        }
        let id = file_id(path);
        if let Some(other) = self
            .planned
            .iter()
            .find(|p| p.canonical == canonical || (id.is_some() && file_id(&p.target) == id))
        {
            return Err(err(format!(
                "is also the {} output; give each output its own file",
                other.flag
            )));
        }
        let inputs: Vec<FileId> = self.files.iter().map(|f| f.id.clone()).collect();
        clean_stale(&dir, &|p| file_id(p).is_some_and(|id| inputs.contains(&id)));
        let tmp = temp_name(&dir, "tmp");
        register(&tmp);
        // `create_new`: a temporary never truncates a file that is there.
        if let Err(e) = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            unregister(&tmp);
            return Err(err(format!(
                "the folder {} is not writable: {e}",
                dir.display()
            )));
        }
        self.planned.push(Planned {
            flag: flag.to_string(),
            target: path.to_path_buf(),
            canonical,
            tmp,
            written: false,
        });
        Ok(())
    }

    fn slot(&mut self, path: &Path) -> Result<&mut Planned> {
        self.planned
            .iter_mut()
            .find(|p| p.target == path)
            .ok_or_else(|| {
                Error::msg(format!(
                    "internal: output {} was not planned before writing",
                    path.display()
                ))
            })
    }

    /// The temporary that output `path` is written into until [`Outputs::commit`] (a command that
    /// reads its own output back while it works, as `tune` reads its profile).
    pub(crate) fn temporary(&self, path: &Path) -> Option<PathBuf> {
        self.planned
            .iter()
            .find(|p| p.target == path)
            .map(|p| p.tmp.clone())
    }

    /// Drops what was written for output `path`: [`Outputs::commit`] leaves its target as it is.
    pub(crate) fn discard(&mut self, path: &Path) {
        if let Some(p) = self.planned.iter_mut().find(|p| p.target == path) {
            p.written = false;
        }
    }

    /// Writes `bytes` as the content of output `path` (into its temporary).
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let slot = self.slot(path)?;
        std::fs::write(&slot.tmp, bytes).map_err(|e| Error::io(path.display().to_string(), e))?;
        slot.written = true;
        Ok(())
    }

    /// Writes tensors as safetensors (f32) into output `path`'s temporary. The bytes are made in
    /// memory and written into the planned temporary: candle's own `save` goes through a
    /// temporary file of its own (mode 0600, and left behind when the process is killed).
    pub fn write_tensors(&mut self, path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
        let shown = path.display().to_string();
        let mut data = Vec::with_capacity(tensors.len());
        for (k, t) in tensors {
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            data.push((k.to_string(), t.dims().to_vec(), bytes));
        }
        let views = data
            .iter()
            .map(|(k, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::io(&shown, format!("tensor `{k}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes =
            safetensors::tensor::serialize(views, None).map_err(|e| Error::io(&shown, e))?;
        self.write(path, &bytes)
    }

    /// Puts every written output in place, all or none: each target is checked again first (absent
    /// or a regular file, and not a file the run read), then the temporaries are renamed over their
    /// targets, each replaced file kept as a hard link until every rename succeeded; a failure
    /// (or a signal) while renaming puts back what was there. Outputs planned but never written
    /// (their step failed or was skipped) are dropped with their temporaries.
    pub fn commit(mut self) -> Result<()> {
        let planned = std::mem::take(&mut self.planned);
        let result = self.commit_all(&planned);
        for p in &planned {
            let _ = std::fs::remove_file(&p.tmp);
            unregister(&p.tmp);
        }
        result
    }

    fn commit_all(&self, planned: &[Planned]) -> Result<()> {
        let written: Vec<&Planned> = planned.iter().filter(|p| p.written).collect();
        for p in &written {
            self.check_target(&p.flag, &p.target)?;
        }
        let mut state = cleanup_state();
        let mut backups = Vec::new();
        let mut failed = None;
        for p in &written {
            let shown = p.target.display().to_string();
            let dir = p.tmp.parent().unwrap_or(Path::new("."));
            let step = (|| -> std::io::Result<()> {
                let undo = match std::fs::symlink_metadata(&p.target) {
                    Ok(old) => {
                        // The replacement keeps the replaced file's mode (a user's `chmod 600`).
                        keep_mode(&p.tmp, &old)?;
                        let backup = temp_name(dir, "bak");
                        match std::fs::hard_link(&p.target, &backup) {
                            Ok(()) => {}
                            // Something already has the backup's name: never written over.
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                                return Err(e)
                            }
                            // A file system without hard links: a copy into a new file (the target
                            // stays in place).
                            Err(_) => copy_new(&p.target, &backup)?,
                        }
                        // Ours from here on: removed on a signal, as every temporary.
                        state.temps.push(backup.clone());
                        backups.push(backup.clone());
                        Undo::Restore {
                            backup,
                            target: p.target.clone(),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Undo::Remove(p.target.clone())
                    }
                    Err(e) => return Err(e),
                };
                std::fs::rename(&p.tmp, &p.target)?;
                state.undo.push(undo);
                Ok(())
            })();
            if let Err(e) = step {
                failed = Some(Error::io(
                    &shown,
                    format!("{}: {e}; no output was replaced", p.flag),
                ));
                break;
            }
        }
        if failed.is_some() {
            roll_back(&mut state.undo);
        } else {
            state.committed = true;
        }
        state.undo.clear();
        for b in &backups {
            let _ = std::fs::remove_file(b);
            state.temps.retain(|t| t != b);
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Copies `from` into `to`, a file created now: an existing `to` is an error, never replaced.
/// Gives `tmp` the permission bits of the file it replaces (`old`), without set-id or sticky bits.
fn keep_mode(tmp: &Path, old: &std::fs::Metadata) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = old.permissions().mode() & 0o777;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        std::fs::set_permissions(tmp, old.permissions())
    }
}

fn copy_new(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    // Created just now: ours to remove if the copy fails.
    let copied = std::io::copy(&mut src, &mut dst).and_then(|_| dst.sync_all());
    if copied.is_err() {
        drop(dst);
        let _ = std::fs::remove_file(to);
    }
    copied
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for p in &self.planned {
            let _ = std::fs::remove_file(&p.tmp);
            unregister(&p.tmp);
        }
    }
}

/// The shard files a `*.index.json` names (its `weight_map` values, resolved against its folder).
fn index_shards(index: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(index) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&str> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    names.sort_unstable();
    names.dedup();
    names.into_iter().map(|f| dir.join(f)).collect()
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename (one output, no input
/// checks: library callers that manage their own paths).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut o = Outputs::new();
    o.plan("output", path)?;
    o.write(path, bytes)?;
    o.commit()
}

/// Writes the final latents as safetensors (`final`), through a temporary file.
pub fn write_latents(path: &Path, t: &Tensor) -> Result<()> {
    let mut o = Outputs::new();
    o.plan("output", path)?;
    o.write_tensors(path, &[("final", t)])?;
    o.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[cfg(unix)]
    #[test]
    fn a_replaced_output_keeps_its_mode_and_a_read_only_one_is_not_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("m.png");
        std::fs::write(&mine, b"old").unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&mine, b"new").unwrap();
        assert_eq!(std::fs::read(&mine).unwrap(), b"new");
        let mode = std::fs::metadata(&mine).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let kept = dir.path().join("kept.png");
        std::fs::write(&kept, b"keep").unwrap();
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = write_atomic(&kept, b"new").unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        assert_eq!(std::fs::read(&kept).unwrap(), b"keep");
    }

    #[test]
    fn a_failed_rename_while_committing_puts_back_every_output() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, n) = (d.path().join("a"), d.path().join("b"), d.path().join("new"));
        std::fs::write(&a, b"old a").unwrap();
        std::fs::write(&b, b"old b").unwrap();
        let mut o = Outputs::new();
        for (flag, p) in [("--a", &a), ("--new", &n), ("--b", &b)] {
            o.plan(flag, p).unwrap();
            o.write(p, flag.as_bytes()).unwrap();
        }
        // The last rename fails (its temporary is gone): the first two are undone.
        let tmp_b = o.planned[2].tmp.clone();
        std::fs::remove_file(&tmp_b).unwrap();
        let e = o.commit().unwrap_err().to_string();
        assert!(
            e.contains("--b") && e.contains("no output was replaced"),
            "{e}"
        );
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        assert_eq!(std::fs::read(&b).unwrap(), b"old b");
        assert!(!n.exists());
        assert_eq!(names(d.path()), ["a", "b"]);
        // A commit that succeeds replaces all and leaves no backup.
        let mut o = Outputs::new();
        for (flag, p) in [("--a", &a), ("--b", &b)] {
            o.plan(flag, p).unwrap();
            o.write(p, flag.as_bytes()).unwrap();
        }
        o.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"--a");
        assert_eq!(std::fs::read(&b).unwrap(), b"--b");
        assert_eq!(names(d.path()), ["a", "b"]);
    }
}
