//! The runner's temporaries: their names (`.magcache-PID-K.EXT`, which no user file is expected
//! to take), the signal handler that removes this process's and undoes a commit under way, and the
//! warning of those that killed processes left (never removed: they may be a user's).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What to undo when a commit is interrupted.
pub(crate) enum Undo {
    /// Put the file that was there back (`backup` is a hard link to it).
    Restore { backup: PathBuf, target: PathBuf },
    /// The target did not exist: remove what the commit put there.
    Remove(PathBuf),
}

/// Temporaries of this process and the undo log of a commit under way, for the signal handler.
pub(crate) struct Cleanup {
    pub(crate) temps: Vec<PathBuf>,
    pub(crate) undo: Vec<Undo>,
    /// Set, under this lock, when a command's outputs went in place: an interruption after it
    /// says so rather than "no output written".
    pub(crate) committed: bool,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    temps: Vec::new(),
    undo: Vec::new(),
    committed: false,
});

pub(crate) fn cleanup_state() -> std::sync::MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner())
}

/// Undoes `undo` (last first): what a failed or interrupted commit had replaced is put back.
pub(crate) fn roll_back(undo: &mut Vec<Undo>) {
    while let Some(u) = undo.pop() {
        match u {
            Undo::Restore { backup, target } => {
                let _ = std::fs::rename(&backup, &target);
            }
            Undo::Remove(target) => {
                let _ = std::fs::remove_file(&target);
            }
        }
    }
}

/// Removes a temporary file or folder. The main thread may still be writing into a folder (an
/// export's shards) while the signal handler removes it: a file it creates between the removal's
/// listing and its last `rmdir` leaves the folder in place, so the removal is tried again until
/// the folder is gone (a writer cannot create a file in a folder that no longer exists, and the
/// writers create no parent folders).
fn remove_temp(t: &Path) {
    for _ in 0..200 {
        match std::fs::symlink_metadata(t) {
            Ok(m) if m.is_dir() => {
                if std::fs::remove_dir_all(t).is_ok() {
                    return;
                }
            }
            Ok(_) => {
                let _ = std::fs::remove_file(t);
                return;
            }
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Removes this process's temporaries on SIGINT/SIGTERM/SIGHUP (undoing a commit under way) and
/// exits with 128 + the signal's number, as a shell reports a process the signal ended (130 on
/// SIGINT, 143 on SIGTERM, 129 on SIGHUP; 130 for all three where that number is not known: not on
/// Linux). The handler holds the cleanup lock until the process exits, and commits put their
/// outputs in place under that lock: an output is either in place whole before the handler runs
/// (then it says so) or never.
pub fn install_signal_cleanup() {
    on_signal(|signal| {
        let mut c = cleanup_state();
        roll_back(&mut c.undo);
        for t in c.temps.iter() {
            remove_temp(t);
        }
        // Not `eprintln!`: a closed stderr (SIGHUP after the terminal went, a dead pipe) would panic
        // the thread before the exit, and the command would go on without its temporaries.
        let line = match c.committed {
            true => "error: interrupted after the outputs were written",
            false => "error: interrupted; no output written",
        };
        let _ = writeln!(std::io::stderr(), "{line}");
        std::process::exit(128 + signal);
    });
}

/// `then(signal)` on a thread of its own at the first SIGINT, SIGTERM or SIGHUP (once per
/// process: a second installation, by tests calling into the library, does nothing). Linux: the
/// signal handlers (signal-hook-registry's, which tokio's signals share) only write the signal's
/// number into a pipe, the one thing a handler may safely do, and the thread reads it. `ctrlc`,
/// used before and elsewhere, does the same but does not say which signal came.
#[cfg(target_os = "linux")]
fn on_signal(then: impl FnOnce(i32) + Send + 'static) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors `pipe2` writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            eprintln!(
                "warning: no signal handler ({}): an interrupted command leaves its temporaries",
                std::io::Error::last_os_error()
            );
            return;
        }
        let (read, write) = (fds[0], fds[1]);
        // A full pipe (no reader left) must not block a handler: the write end does not wait.
        // SAFETY: `fcntl` on a descriptor this function owns.
        unsafe { libc::fcntl(write, libc::F_SETFL, libc::O_NONBLOCK) };
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            if signal == libc::SIGHUP && ignored(signal) {
                continue;
            }
            let byte = signal as u8;
            // SAFETY: the action calls `write` alone, which is async-signal-safe; it allocates,
            // locks and panics not. The pipe stays open for the process's life.
            let _ = unsafe {
                signal_hook_registry::register(signal, move || {
                    libc::write(write, (&byte as *const u8).cast(), 1);
                })
            };
        }
        std::thread::spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: one byte into `byte`.
                match unsafe { libc::read(read, (&mut byte as *mut u8).cast(), 1) } {
                    1 => return then(i32::from(byte)),
                    n if n < 0
                        && std::io::Error::last_os_error().kind()
                            == std::io::ErrorKind::Interrupted => {}
                    _ => return,
                }
            }
        });
    });
}

/// Whether `signal` was ignored when this process started: `nohup` ignores SIGHUP, which is then
/// left ignored. (SIGINT and SIGTERM are handled whatever: a shell's background jobs start with
/// SIGINT ignored, and an interrupted command must still clean up.)
#[cfg(target_os = "linux")]
fn ignored(signal: libc::c_int) -> bool {
    // SAFETY: reads the action only (a null new action); `old` is a valid `sigaction` to fill.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

#[cfg(not(target_os = "linux"))]
fn on_signal(then: impl FnOnce(i32) + Send + 'static) {
    let then = Mutex::new(Some(then));
    // A second installation (tests calling into the library) is refused by ctrlc: harmless.
    let _ = ctrlc::set_handler(move || {
        if let Some(f) = then.lock().unwrap_or_else(|e| e.into_inner()).take() {
            f(2)
        }
    });
}

pub(crate) fn register(tmp: &Path) {
    cleanup_state().temps.push(tmp.to_path_buf());
}

pub(crate) fn unregister(tmp: &Path) {
    cleanup_state().temps.retain(|p| p != tmp);
}

static NEXT_TEMP: AtomicUsize = AtomicUsize::new(0);

/// A fresh, short temporary name in `dir`: `.magcache-PID-K.EXT` (short whatever the output's name,
/// so that a legal 255-byte output name keeps a legal temporary), none that is there already (an
/// earlier process of the same id, killed, may have left one; its creation still refuses to
/// replace anything).
pub(crate) fn temp_name(dir: &Path, ext: &str) -> PathBuf {
    loop {
        let k = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!(".magcache-{}-{k}.{ext}", std::process::id()));
        if p.symlink_metadata().is_err() || k >= 1 << 20 {
            return p;
        }
    }
}

/// The process id in the name of a temporary this runner makes: `.magcache-PID-K.tmp`, `.bak`,
/// `.partial`. (Earlier versions' `.NAME.magcache-PID.tmp` files and exports' `.NAME.partial-PID`
/// folders are not matched: a user's file could be named so.)
fn temp_pid(name: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let rest = name.strip_prefix(".magcache-")?;
    let (pid, rest) = rest.split_once('-')?;
    let (k, ext) = rest.split_once('.')?;
    if digits(pid) && digits(k) && matches!(ext, "tmp" | "bak" | "partial") {
        return pid.parse().ok();
    }
    None
}

/// Whether this process's user owns `m`'s file (a temporary it could have made); on systems
/// without owners, true.
fn owned_by_us(m: &std::fs::Metadata) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        m.uid() == unsafe { libc::geteuid() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = m;
        true
    }
}

/// Warns of the temporaries (files, and export's partial folders) that processes no longer alive
/// left in `dir` (a SIGKILL leaves them), and removes none of them: a name of the runner's pattern
/// may still be a user's file (or the only copy of an output a killed commit was replacing), and
/// the runner deletes only what it created in this process. `keep` names files said nothing of
/// (this run's inputs).
pub(crate) fn clean_stale(dir: &Path, keep: &dyn Fn(&Path) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut left: Vec<String> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = temp_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) || keep(&e.path()) {
            continue;
        }
        if matches!(std::fs::symlink_metadata(e.path()), Ok(m) if owned_by_us(&m)) {
            left.push(e.path().display().to_string());
        }
    }
    left.sort();
    if let Some(first) = left.first() {
        let more = match left.len() {
            1 => String::new(),
            n => format!(" and {} more of the same pattern", n - 1),
        };
        eprintln!(
            "warning: {first}{more}: left by a runner process that is gone (killed while writing); not removed (a `.bak` is what a killed commit was replacing): delete it once you no longer need it"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_name_left_by_an_earlier_process_of_our_id_is_passed_over() {
        let d = tempfile::tempdir().unwrap();
        let next = NEXT_TEMP.load(Ordering::Relaxed);
        let pid = std::process::id();
        for k in next..next + 3 {
            std::fs::write(d.path().join(format!(".magcache-{pid}-{k}.tmp")), "left").unwrap();
        }
        let t = temp_name(d.path(), "tmp");
        assert!(t.symlink_metadata().is_err(), "{}", t.display());
    }

    #[test]
    fn temporaries_are_recognised_by_name_only() {
        assert_eq!(temp_pid(".magcache-123-4.tmp"), Some(123));
        assert_eq!(temp_pid(".magcache-123-4.bak"), Some(123));
        assert_eq!(temp_pid(".magcache-123-0.partial"), Some(123));
        for not in [
            ".out.safetensors.magcache-77.tmp",
            "magcache-1-2.tmp",
            ".magcache-1-2.txt",
            ".magcache-x-2.tmp",
            ".magcache-1.tmp",
            "out.tmp",
            ".notes.partial-x",
            ".ckpt.partial-88",
        ] {
            assert_eq!(temp_pid(not), None, "{not}");
        }
    }
}
