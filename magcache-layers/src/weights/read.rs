//! Bytes `start..end` of an open checkpoint file that was `opened_len` bytes long when its header
//! was read. The file's current length is checked first and the bytes are read with `pread` (not
//! through a memory map): a file truncated or rewritten under the run is an error, in words, never
//! a SIGBUS.

use candle_core::{Device, Tensor};

/// The tensor of `shape` whose little-endian f32 values lie at `start..end` of `file` (a whole
/// number of them, on a little-endian machine: the caller checks), read into its vector (no
/// intermediate byte buffer).
pub(super) fn read_f32(
    file: &std::fs::File,
    opened_len: u64,
    start: usize,
    end: usize,
    shape: &[usize],
) -> std::result::Result<Tensor, String> {
    let n = end.saturating_sub(start);
    let mut v: Vec<f32> = vec![0.0; n / 4];
    // SAFETY: every bit pattern is a valid f32; the slice covers exactly the vector's `n`
    // initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), n) };
    read_range_into(file, opened_len, start, end, bytes)?;
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(magcache_core::error::candle_text)
}

pub(super) fn read_range(
    file: &std::fs::File,
    opened_len: u64,
    start: usize,
    end: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut buf = vec![0u8; end.saturating_sub(start)];
    read_range_into(file, opened_len, start, end, &mut buf)?;
    Ok(buf)
}

/// Reads `start..end` of `file` into `buf` (its length), naming a file that shrank since it was
/// opened (`opened_len`).
fn read_range_into(
    file: &std::fs::File,
    opened_len: u64,
    start: usize,
    end: usize,
    buf: &mut [u8],
) -> std::result::Result<(), String> {
    let shrunk = |now: u64| {
        format!(
            "the checkpoint file changed while the run read it: it is {now} bytes now ({opened_len} when opened) and the tensor's data ends at byte {end}; do not truncate or rewrite a checkpoint a run is reading"
        )
    };
    let now = file.metadata().map_err(|e| e.to_string())?.len();
    if (end as u64) > now {
        return Err(shrunk(now));
    }
    read_exact_at(file, buf, start as u64).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            shrunk(file.metadata().map(|m| m.len()).unwrap_or(0))
        } else {
            format!("cannot read the tensor's data: {e}")
        }
    })
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
