//! Whether an export fits the disk it is written to.

use magcache_core::{Error, GeneratedWeights, Result};
use std::path::Path;

/// Refuses an export whose tensors (`models`, written unquantized) need more bytes than the file
/// system of `parent` has free: it would fill the disk, then fail and remove what it wrote.
pub(super) fn check_disk(parent: &Path, models: &[GeneratedWeights], out: &str) -> Result<()> {
    let need: u64 = models
        .iter()
        .flat_map(|m| &m.tensors)
        .filter_map(|(_, shape, dtype)| super::nbytes(shape, *dtype))
        .fold(0u64, u64::saturating_add);
    match free_bytes(parent) {
        Some(free) if need > free => Err(Error::io(
            out,
            format!(
                "the export writes {:.2} GB and {} has {:.2} GB free",
                need as f64 / 1e9,
                parent.display(),
                free as f64 / 1e9
            ),
        )),
        _ => Ok(()),
    }
}

/// Bytes an unprivileged user may still write on the file system of `dir` (Linux; elsewhere
/// unknown).
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: `c` is a valid NUL-terminated path and `st` a zeroed struct statvfs fills.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}
