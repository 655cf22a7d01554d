//! Writing output files safely.
//!
//! Every output a command will write is checked before any work ([`Outputs::plan`]): it must not be
//! one of the run's inputs (config, inputs file, weights, profile, ...) nor another output of the
//! same command, and its folder must exist and be writable. Planning creates an empty temporary file
//! beside the target (proving the folder writable); results are written into the temporaries
//! ([`Outputs::write`]) and [`Outputs::commit`] renames them all into place once everything
//! succeeded. Until then nothing the user owns changes; temporaries are removed when the command
//! fails, is dropped, or is interrupted (SIGINT, SIGTERM, SIGHUP: [`install_signal_cleanup`]); ones
//! left by a killed run (SIGKILL) are removed by the next run that writes the same output. Files are
//! created with `File::create`, so their permissions follow the umask.

use candle_core::Tensor;
use magcache_core::{Error, Result, RunConfig};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporaries of this process, removed by the signal handler.
static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes this process's temporaries on SIGINT/SIGTERM/SIGHUP and exits with 130.
pub fn install_signal_cleanup() {
    // A second installation (tests calling into the library) is refused by ctrlc: harmless.
    let _ = ctrlc::set_handler(|| {
        if let Ok(temps) = TEMPS.lock() {
            for t in temps.iter() {
                if t.is_dir() {
                    let _ = std::fs::remove_dir_all(t);
                } else {
                    let _ = std::fs::remove_file(t);
                }
            }
        }
        eprintln!("error: interrupted; no output written");
        std::process::exit(130);
    });
}

pub(crate) fn register(tmp: &Path) {
    if let Ok(mut t) = TEMPS.lock() {
        t.push(tmp.to_path_buf());
    }
}

pub(crate) fn unregister(tmp: &Path) {
    if let Ok(mut t) = TEMPS.lock() {
        t.retain(|p| p != tmp);
    }
}

/// A file or folder the command reads, with what it is (for messages).
#[derive(Clone, Debug)]
struct Input {
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
    inputs: Vec<Input>,
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

/// Whether process `pid` is alive (Linux: `/proc/PID`; elsewhere assumed alive, so nothing of a
/// running process is ever removed).
fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a file or folder the command reads.
    pub fn input(&mut self, path: &Path, what: &str) {
        self.inputs.push(Input {
            path: path.to_path_buf(),
            what: what.to_string(),
        });
    }

    /// Registers every file a run config reads: the config itself, `inputs.file`, `model.weights`
    /// (files, or folders with everything in them), `model.config`, and the strategy's files.
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
                self.input(&path, "the model weights (model.weights)");
            }
        }
        for (key, p) in cfg.strategy().input_files() {
            self.input(&resolve(base, &p), &format!("an input of the run ({key})"));
        }
        Ok(())
    }

    /// Checks an output before any work and creates its (empty) temporary. `flag` names it in
    /// messages (`--out`, `--report`, ...).
    pub fn plan(&mut self, flag: &str, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let err = |why: String| Error::io(&shown, format!("{flag}: {why}"));
        if path.is_dir() {
            return Err(err("is a folder; give a file path".into()));
        }
        let name = path
            .file_name()
            .ok_or_else(|| err("not a file path".into()))?;
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
        for i in &self.inputs {
            let Some(ic) = identity(&i.path) else {
                continue;
            };
            if ic == canonical {
                return Err(err(format!(
                    "is {} ({}); refusing to overwrite it",
                    i.what,
                    i.path.display()
                )));
            }
            if ic.is_dir() && canonical.starts_with(&ic) && canonical.exists() {
                return Err(err(format!(
                    "is a file inside {} ({}); refusing to overwrite it",
                    i.what,
                    i.path.display()
                )));
            }
        }
        if let Some(other) = self.planned.iter().find(|p| p.canonical == canonical) {
            return Err(err(format!(
                "is also the {} output; give each output its own file",
                other.flag
            )));
        }
        let name = name.to_string_lossy();
        // Temporaries of killed runs (SIGKILL) of this same output.
        let prefix = format!(".{name}.magcache-");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                let pid = f
                    .strip_prefix(&prefix)
                    .and_then(|r| r.strip_suffix(".tmp"))
                    .and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid {
                    if pid != std::process::id() && !pid_alive(pid) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let tmp = dir.join(format!("{prefix}{}.tmp", std::process::id()));
        register(&tmp);
        if let Err(e) = std::fs::File::create(&tmp) {
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

    /// Writes `bytes` as the content of output `path` (into its temporary).
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let slot = self.slot(path)?;
        std::fs::write(&slot.tmp, bytes).map_err(|e| Error::io(path.display().to_string(), e))?;
        slot.written = true;
        Ok(())
    }

    /// Lets `write` fill output `path`'s temporary (an external writer such as ffmpeg).
    pub fn write_with(
        &mut self,
        path: &Path,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let slot = self.slot(path)?;
        write(&slot.tmp)?;
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
                    .map_err(|e| Error::io(&shown, format!("tensor `{k}`: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::tensor::serialize(views, None)
            .map_err(|e| Error::io(&shown, format!("{e:?}")))?;
        self.write(path, &bytes)
    }

    /// Renames every written temporary into place. Outputs planned but never written (their step
    /// failed or was skipped) are dropped with their temporaries.
    pub fn commit(mut self) -> Result<()> {
        let planned = std::mem::take(&mut self.planned);
        let mut first_err = None;
        for p in planned {
            if p.written && first_err.is_none() {
                if let Err(e) = std::fs::rename(&p.tmp, &p.target) {
                    first_err = Some(Error::io(p.target.display().to_string(), e));
                }
            }
            let _ = std::fs::remove_file(&p.tmp);
            unregister(&p.tmp);
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for p in &self.planned {
            let _ = std::fs::remove_file(&p.tmp);
            unregister(&p.tmp);
        }
    }
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
