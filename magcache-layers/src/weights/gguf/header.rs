//! Reading a GGUF file's header (versions 2 and 3) with every count, length, depth and offset it
//! claims bounded before anything is allocated for it.

use magcache_core::{Error, Result};
use std::collections::HashMap;
use std::io::Read;

/// A GGUF header: metadata and tensor infos. Read here rather than with candle's `gguf_file`,
/// which refuses tensors of more than 4 dimensions (Wan's 5-D `patch_embedding.weight`, legal in
/// city96's files) and names no tensor when a type is unknown.
pub struct Header {
    pub metadata: HashMap<String, Meta>,
    /// Name, dims in GGUF's `ne` order, ggml type id, offset from the data start.
    pub tensors: Vec<(String, Vec<usize>, u32, u64)>,
    pub data_start: u64,
}

/// A metadata value (only what the loader reads is kept: strings, integers, arrays of them).
#[derive(Clone, Debug)]
pub enum Meta {
    Str(String),
    Int(i128),
    Array(Vec<Meta>),
    Other,
}

/// The most values one tensor may claim (2^50: a petabyte of f8).
const MAX_TENSOR_VALUES: u64 = 1 << 50;
/// How deep metadata arrays may nest.
const MAX_META_DEPTH: usize = 8;
/// How many metadata values (array elements included) a header may hold: far above a diffusion
/// checkpoint's (a few thousand) and an LLM tokenizer's vocabulary (~150 000 strings).
const MAX_META_VALUES: u64 = 1 << 22;

struct Reader<'a, R: Read> {
    r: &'a mut R,
    pos: u64,
    /// Metadata values the header may still hold ([`MAX_META_VALUES`] at the start).
    values_left: u64,
}

impl<R: Read> Reader<'_, R> {
    fn bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        self.pos += n as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> std::io::Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(std::io::Error::other(format!("a string of {n} bytes")));
        }
        let b = self.bytes(n as usize)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> std::io::Result<Meta> {
        let int = |b: Vec<u8>, signed: bool| -> i128 {
            let mut a = [0u8; 16];
            let n = b.len();
            a[..n].copy_from_slice(&b);
            if signed && b[n - 1] & 0x80 != 0 {
                a[n..].fill(0xff);
            }
            i128::from_le_bytes(a)
        };
        Ok(match ty {
            0 | 7 => Meta::Int(int(self.bytes(1)?, false)),
            1 => Meta::Int(int(self.bytes(1)?, true)),
            2 => Meta::Int(int(self.bytes(2)?, false)),
            3 => Meta::Int(int(self.bytes(2)?, true)),
            4 => Meta::Int(int(self.bytes(4)?, false)),
            5 => Meta::Int(int(self.bytes(4)?, true)),
            10 => Meta::Int(int(self.bytes(8)?, false)),
            11 => Meta::Int(int(self.bytes(8)?, true)),
            6 => {
                self.bytes(4)?;
                Meta::Other
            }
            12 => {
                self.bytes(8)?;
                Meta::Other
            }
            8 => Meta::Str(self.string()?),
            9 => {
                // Arrays of arrays are legal; no real file nests them deeper than a few levels,
                // and a recursion without a bound is a stack overflow on a crafted header.
                if depth >= MAX_META_DEPTH {
                    return Err(std::io::Error::other(format!(
                        "arrays nested more than {MAX_META_DEPTH} deep"
                    )));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                if n > self.values_left {
                    return Err(std::io::Error::other(format!(
                        "an array of {n} values (a header holds at most {MAX_META_VALUES} in all)"
                    )));
                }
                self.values_left -= n;
                // Grown as values are read, never reserved from the count the file claims.
                let mut v = Vec::with_capacity((n as usize).min(1024));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Meta::Array(v)
            }
            t => return Err(std::io::Error::other(format!("metadata value type {t}"))),
        })
    }
}

/// Reads a GGUF header (versions 2 and 3).
pub fn read_header<R: Read>(r: &mut R, shown: &str) -> Result<Header> {
    let err = |key: &str, e: String| Error::weights(shown, key, e);
    let mut rd = Reader {
        r,
        pos: 0,
        values_left: MAX_META_VALUES,
    };
    let io = |e: std::io::Error| err("(header)", format!("not a readable GGUF header: {e}"));
    if rd.bytes(4).map_err(io)? != b"GGUF" {
        return Err(err("(header)", "not a GGUF file (no `GGUF` magic)".into()));
    }
    let version = rd.u32().map_err(io)?;
    if !(2..=3).contains(&version) {
        return Err(err(
            "(header)",
            format!("GGUF version {version}; versions 2 and 3 are read"),
        ));
    }
    let n_tensors = rd.u64().map_err(io)?;
    let n_kv = rd.u64().map_err(io)?;
    if n_tensors > 1 << 24 || n_kv > 1 << 24 {
        return Err(err(
            "(header)",
            format!("claims {n_tensors} tensors and {n_kv} metadata entries"),
        ));
    }
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        // Each entry counts as a value: the header's metadata stays within one budget however
        // it is split between entries and arrays.
        if rd.values_left == 0 {
            return Err(err(
                "(header)",
                format!("more than {MAX_META_VALUES} metadata values"),
            ));
        }
        rd.values_left -= 1;
        let key = rd.string().map_err(io)?;
        let ty = rd.u32().map_err(io)?;
        let v = rd
            .value(ty, 0)
            .map_err(|e| err(&key, format!("unreadable metadata: {e}")))?;
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity((n_tensors as usize).min(4096));
    for i in 0..n_tensors {
        tensors.push(tensor_info(&mut rd, i, n_tensors, shown)?);
    }
    let align = match metadata.get("general.alignment") {
        None => 32,
        Some(Meta::Int(a)) if *a > 0 && *a <= 1 << 20 && (*a as u64).is_power_of_two() => *a as u64,
        Some(a) => {
            return Err(err(
                "general.alignment",
                format!("must be a power of two up to 1 MiB, got {a:?}"),
            ))
        }
    };
    // ggml aligns every tensor's data to `general.alignment`: an offset off it is a corrupt or
    // hand-made file whose tensors would be read shifted.
    if let Some((name, _, _, off)) = tensors.iter().find(|t| t.3 % align != 0) {
        return Err(err(
            name,
            format!("data offset {off} is not a multiple of the file's alignment {align}"),
        ));
    }
    let data_start = rd.pos.div_ceil(align) * align;
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

/// One tensor's description (the `i`-th of `n`): name, dims in `ne` order, ggml type, offset.
fn tensor_info<R: Read>(
    rd: &mut Reader<'_, R>,
    i: u64,
    n: u64,
    shown: &str,
) -> Result<(String, Vec<usize>, u32, u64)> {
    let err = |key: &str, e: String| Error::weights(shown, key, e);
    let io = |e: std::io::Error| err("(header)", format!("not a readable GGUF header: {e}"));
    let name = rd.string().map_err(io)?;
    // A name that is empty or not printable is no tensor's: a header claiming more tensors than
    // it describes reads them out of the padding.
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(err(
            "(header)",
            format!("tensor {i} of {n} has the name {name:?}: a damaged header (more tensors claimed than described?)"),
        ));
    }
    let nd = rd.u32().map_err(io)?;
    if nd > 8 {
        return Err(err(&name, format!("has {nd} dimensions")));
    }
    let mut dims = Vec::with_capacity(nd as usize);
    for _ in 0..nd {
        let d = rd.u64().map_err(io)?;
        dims.push(usize::try_from(d).map_err(|_| err(&name, format!("dimension {d}")))?);
    }
    // Sizes are multiplied out later (bytes, footprints): a product past 2^50 values is no real
    // tensor, and past 2^64 an overflow.
    let elems = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .filter(|&e| e <= MAX_TENSOR_VALUES);
    if elems.is_none() {
        return Err(err(
            &name,
            format!("dimensions {dims:?} claim more than 2^50 values"),
        ));
    }
    let ty = rd.u32().map_err(io)?;
    let offset = rd.u64().map_err(io)?;
    Ok((name, dims, ty, offset))
}
