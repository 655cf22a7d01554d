//! GGUF checkpoints (city96's ComfyUI-GGUF files for Wan and FLUX, see the contract's "GGUF"):
//! the header read here (`read_header`), each tensor read from the file and dequantized
//! (candle's ggml blocks: `d * q`, `d * q + m`, in f32) when the model asks for it: once at load for
//! a held model, each time its block is read for a streamed one (`offload = "stream"`: nothing but
//! the running blocks is resident). Shapes are GGUF's `ne` reversed into torch order (candle does
//! that); a `comfy.gguf.orig_shape.<name>` metadata array overrides the stored shape; names lose a
//! `model.diffusion_model.` prefix.

use super::{Entry, WeightStore};
pub use header::{read_header, Header, Meta};

mod header;
mod repack;
mod write;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use magcache_core::{Error, Result};
pub use repack::{gguf_repacked_bytes, repacked_bytes, RepackCpu};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};
pub use write::{quant_name, quant_type, write_gguf};

/// Whether `path` names a GGUF file (by its extension, as people name them).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Where a GGUF tensor lies: its file (read with a seek and a read, never a memory map, so a file
/// that shrinks under the run is an error, not a SIGBUS), its byte range and ggml type.
pub struct GgufEntry {
    file: Arc<Mutex<std::fs::File>>,
    dtype: GgmlDType,
    start: u64,
    len: usize,
    /// The shape candle reads the blocks with (GGUF's `ne` reversed).
    pub stored: Vec<usize>,
    /// Torch order, after a `comfy.gguf.orig_shape` override.
    pub shape: Vec<usize>,
}

impl GgufEntry {
    /// Whether its type is a quantized one (not F32, F16, BF16).
    pub fn is_quantized(&self) -> bool {
        !matches!(
            self.dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        )
    }

    fn bytes(&self, file: &str, name: &str) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.len];
        self.read_into(&mut bytes, file, name)?;
        Ok(bytes)
    }

    /// Reads the tensor's bytes into `bytes` (its length).
    fn read_into(&self, bytes: &mut [u8], file: &str, name: &str) -> Result<()> {
        let mut f = self
            .file
            .lock()
            .map_err(|_| Error::weights(file, name, "file handle poisoned"))?;
        f.seek(SeekFrom::Start(self.start))
            .and_then(|_| f.read_exact(bytes))
            .map_err(|e| {
                Error::weights(
                    file,
                    name,
                    format!(
                        "cannot read its {} bytes at {} ({e}): was the file truncated?",
                        self.len, self.start
                    ),
                )
            })
    }

    /// The tensor as candle's quantized tensor on `device` (its stored shape); with `check`, its
    /// values are first checked finite block by block ([`check_finite_blocks`]).
    pub fn read_quantized(
        &self,
        file: &str,
        name: &str,
        device: &Device,
        check: bool,
    ) -> Result<candle_core::quantized::QTensor> {
        if device.is_cpu() {
            if let Some(q) = self.read_blocks_cpu(file, name, check)? {
                return Ok(q);
            }
        }
        let bytes = self.bytes(file, name)?;
        if check {
            check_finite_blocks(self.dtype, &bytes, file, name)?;
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            &bytes,
            self.stored.clone(),
            device,
        )
        .map_err(|e| {
            let e = magcache_core::error::candle_text(e);
            Error::weights(file, name, format!("{:?}: {e}", self.dtype))
        })
    }

    /// A quantized tensor read straight into the block vector candle keeps (CPU): one allocation
    /// of the tensor's size, no intermediate byte buffer and no copy. `None` for a type read the
    /// general way.
    fn read_blocks_cpu(
        &self,
        file: &str,
        name: &str,
        check: bool,
    ) -> Result<Option<candle_core::quantized::QTensor>> {
        use candle_core::quantized::k_quants as k;
        let storage = match self.dtype {
            GgmlDType::Q4_0 => self.blocks::<k::BlockQ4_0>(file, name, check)?,
            GgmlDType::Q4_1 => self.blocks::<k::BlockQ4_1>(file, name, check)?,
            GgmlDType::Q5_0 => self.blocks::<k::BlockQ5_0>(file, name, check)?,
            GgmlDType::Q5_1 => self.blocks::<k::BlockQ5_1>(file, name, check)?,
            GgmlDType::Q8_0 => self.blocks::<k::BlockQ8_0>(file, name, check)?,
            GgmlDType::Q2K => self.blocks::<k::BlockQ2K>(file, name, check)?,
            GgmlDType::Q3K => self.blocks::<k::BlockQ3K>(file, name, check)?,
            GgmlDType::Q4K => self.blocks::<k::BlockQ4K>(file, name, check)?,
            GgmlDType::Q5K => self.blocks::<k::BlockQ5K>(file, name, check)?,
            GgmlDType::Q6K => self.blocks::<k::BlockQ6K>(file, name, check)?,
            _ => None,
        };
        storage
            .map(|st| candle_core::quantized::QTensor::new(st, self.stored.clone()))
            .transpose()
            .map_err(|e| {
                let e = magcache_core::error::candle_text(e);
                Error::weights(file, name, format!("{:?}: {e}", self.dtype))
            })
    }

    /// The blocks of type `T` read into their vector; `None` when `T`'s in-memory size is not the
    /// file's block size (then the general path reads it).
    fn blocks<T: candle_core::quantized::k_quants::GgmlType + Send + Sync + 'static>(
        &self,
        file: &str,
        name: &str,
        check: bool,
    ) -> Result<Option<candle_core::quantized::QStorage>> {
        let size = std::mem::size_of::<T>();
        if size != self.dtype.type_size() || !self.len.is_multiple_of(size) {
            return Ok(None);
        }
        let mut v: Vec<T> = vec![T::zeros(); self.len / size];
        // SAFETY: ggml blocks are `repr(C)` aggregates of f16 scales and integer arrays with no
        // padding (size checked equal to the file's block size above): every byte pattern is a
        // valid block, and the slice covers exactly the vector's initialised elements.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), self.len) };
        self.read_into(bytes, file, name)?;
        if check {
            check_finite_blocks(self.dtype, bytes, file, name)?;
        }
        Ok(Some(candle_core::quantized::QStorage::Cpu(Box::new(v))))
    }

    /// The tensor dequantized to f32 (ggml's `d * q`, `d * q + m`) on the CPU.
    pub fn read(&self, file: &str, name: &str) -> Result<Tensor> {
        let err = |e: String| Error::weights(file, name, e);
        let bytes = self.bytes(file, name)?;
        let float = match self.dtype {
            GgmlDType::F32 => Some(candle_core::DType::F32),
            GgmlDType::F16 => Some(candle_core::DType::F16),
            GgmlDType::BF16 => Some(candle_core::DType::BF16),
            _ => None,
        };
        if let Some(dt) = float {
            // Plain floats (any rank: Wan's patch embedding is 5-D).
            return Tensor::from_raw_buffer(&bytes, dt, &self.stored, &Device::Cpu)
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.reshape(self.shape.as_slice()))
                .map_err(|e| err(magcache_core::error::candle_text(e)));
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            &bytes,
            self.stored.clone(),
            &Device::Cpu,
        )
        .map_err(|e| {
            err(format!(
                "{:?}: {}",
                self.dtype,
                magcache_core::error::candle_text(e)
            ))
        })?;
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.reshape(self.shape.as_slice()))
            .map_err(|e| {
                err(format!(
                    "{:?}: {}",
                    self.dtype,
                    magcache_core::error::candle_text(e)
                ))
            })
    }
}

/// Blocks dequantized at a time by [`check_finite_blocks`] (64 Ki values, 256 KiB of f32).
const CHECK_BLOCKS: usize = 2048;

/// Checks that the quantized tensor in `bytes` (whole blocks of `dtype`) dequantizes to finite
/// values, a slice of `CHECK_BLOCKS` blocks at a time, so the check never holds more than one
/// small f32 slice (it used to dequantize the whole matrix once, an f32 copy four times the size
/// of a Q8_0 tensor).
pub fn check_finite_blocks(dtype: GgmlDType, bytes: &[u8], file: &str, name: &str) -> Result<()> {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    if ts == 0 || !bytes.len().is_multiple_of(ts) {
        return Err(Error::weights(
            file,
            name,
            format!(
                "{dtype:?}: {} bytes is not a whole number of {ts}-byte blocks",
                bytes.len()
            ),
        ));
    }
    for chunk in bytes.chunks(CHECK_BLOCKS * ts) {
        let n = chunk.len() / ts * bs;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            chunk,
            vec![n],
            &Device::Cpu,
        )
        .and_then(|q| q.dequantize(&Device::Cpu))
        .map_err(|e| {
            let e = magcache_core::error::candle_text(e);
            Error::weights(file, name, format!("{dtype:?}: {e}"))
        })?;
        if !magcache_core::finite::all_finite(&q)
            .map_err(|e| Error::weights(file, name, e.to_string()))?
        {
            return Err(Error::weights(file, name, "holds non-finite values"));
        }
    }
    Ok(())
}

impl WeightStore {
    /// Opens a GGUF file (its header only; tensors are read when handed out); returns the store and
    /// the file's `general.architecture`.
    pub fn load_gguf(path: &Path) -> Result<(WeightStore, Option<String>)> {
        let shown = path.display().to_string();
        if let Some(why) = magcache_core::error::not_a_file(path) {
            return Err(Error::weights(&shown, "(file)", why));
        }
        let f = magcache_core::error::open_regular(path)?;
        let file_len = f.metadata().map_err(|e| Error::io(&shown, e))?.len();
        let h = read_header(&mut std::io::BufReader::new(&f), &shown)?;
        let arch = architecture(&h, &shown)?;
        let handle = Arc::new(Mutex::new(f));
        let mut spans = Vec::with_capacity(h.tensors.len());
        let mut store = WeightStore {
            files: vec![shown.clone()],
            origin: shown.clone(),
            ..Default::default()
        };
        for (name, ne, ty, offset) in &h.tensors {
            let dtype = ggml_type(*ty).ok_or_else(|| {
                Error::weights(
                    &shown,
                    name,
                    format!("has ggml type {ty}, which this runner does not read (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)"),
                )
            })?;
            let shape = shape_of(&h, name, ne, &shown)?;
            let stored: Vec<usize> = ne.iter().rev().copied().collect();
            let elems: usize = stored.iter().product();
            let block = dtype.block_size();
            if block == 0 || !elems.is_multiple_of(block) {
                return Err(Error::weights(
                    &shown,
                    name,
                    format!("{elems} elements are not whole {dtype:?} blocks of {block}"),
                ));
            }
            let len = elems / block * dtype.type_size();
            let start = h.data_start.saturating_add(*offset);
            if start.saturating_add(len as u64) > file_len {
                return Err(Error::weights(
                    &shown,
                    name,
                    format!("its {len} bytes at {start} lie outside the file ({file_len} bytes): truncated?"),
                ));
            }
            let key = name.strip_prefix("model.diffusion_model.").unwrap_or(name);
            if store.tensors.contains_key(key) {
                let how = if key == name.as_str()
                    && h.tensors.iter().filter(|t| &t.0 == name).count() > 1
                {
                    "twice"
                } else {
                    "under two names (with and without `model.diffusion_model.`)"
                };
                return Err(Error::weights(
                    &shown,
                    name,
                    format!(
                        "holds tensor `{key}` {how}: which one the model gets would be a guess"
                    ),
                ));
            }
            spans.push((start, len as u64, name.as_str()));
            store.tensors.insert(
                key.to_string(),
                (
                    Entry::Gguf(GgufEntry {
                        file: handle.clone(),
                        dtype,
                        start,
                        len,
                        stored,
                        shape,
                    }),
                    0,
                ),
            );
        }
        overlapping(&mut spans, &shown)?;
        Ok((store, arch))
    }
}

/// Refuses tensors whose data overlap (`spans`: start, length, name): each tensor of a GGUF file
/// has bytes of its own, so two sharing some are a damaged or hand-made file whose weights would
/// be read as each other's (as the safetensors reader refuses them).
fn overlapping(spans: &mut [(u64, u64, &str)], shown: &str) -> Result<()> {
    spans.sort_unstable();
    let mut held = spans.iter().filter(|s| s.1 > 0);
    let Some(mut last) = held.next() else {
        return Ok(());
    };
    for s in held {
        if s.0 < last.0 + last.1 {
            return Err(Error::weights(
                shown,
                s.2,
                format!(
                    "its bytes at {} overlap those of tensor `{}` ({} bytes at {}): a damaged file",
                    s.0, last.2, last.1, last.0
                ),
            ));
        }
        last = s;
    }
    Ok(())
}

/// ggml's type ids (ggml.h) that candle's blocks read.
fn ggml_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        // Q8_1 (9) and Q8_K (15) are candle's activation formats: it cannot dequantize them.
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// `general.architecture`: a string, or absent (a number or an array is an error, not "missing").
fn architecture(h: &Header, shown: &str) -> Result<Option<String>> {
    match h.metadata.get("general.architecture") {
        Some(Meta::Str(s)) => Ok(Some(s.clone())),
        None => Ok(None),
        Some(_) => Err(Error::weights(
            shown,
            "general.architecture",
            "is not a string (the model's architecture name, e.g. `wan` or `flux`)",
        )),
    }
}

/// A tensor's shape in torch order: GGUF's `ne` reversed, or its `comfy.gguf.orig_shape.<name>`.
fn shape_of(h: &Header, name: &str, ne: &[usize], shown: &str) -> Result<Vec<usize>> {
    let stored: Vec<usize> = ne.iter().rev().copied().collect();
    let key = format!("comfy.gguf.orig_shape.{name}");
    let Some(v) = h.metadata.get(&key) else {
        return Ok(stored);
    };
    let dims = match v {
        Meta::Array(a) => a
            .iter()
            .map(|m| match m {
                Meta::Int(i) => usize::try_from(*i).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>(),
        _ => None,
    }
    .ok_or_else(|| Error::weights(shown, &key, "is not an array of dimensions"))?;
    let count = |d: &[usize]| d.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
    if dims.is_empty() || count(&dims).is_none() || count(&dims) != count(&stored) {
        return Err(Error::weights(
            shown,
            &key,
            format!("{dims:?} does not hold the {stored:?} elements stored"),
        ));
    }
    Ok(dims)
}

/// A GGUF file's `general.architecture` and its tensors' names (without a `model.diffusion_model.`
/// prefix) and shapes, from the header alone (no tensor data is read: `plan` and the size guard).
pub fn gguf_header(path: &Path) -> Result<GgufHeader> {
    let shown = path.display().to_string();
    if let Some(why) = magcache_core::error::not_a_file(path) {
        return Err(Error::weights(&shown, "(file)", why));
    }
    let f = magcache_core::error::open_regular(path)?;
    let h = read_header(&mut std::io::BufReader::new(f), &shown)?;
    let mut out = Vec::new();
    for (name, ne, _, _) in &h.tensors {
        let shape = shape_of(&h, name, ne, &shown)?;
        let key = name.strip_prefix("model.diffusion_model.").unwrap_or(name);
        out.push((key.to_string(), shape));
    }
    out.sort();
    let config = match h.metadata.get(CONFIG_KEY) {
        None => None,
        Some(Meta::Str(s)) => Some(s.clone()),
        Some(_) => {
            return Err(Error::weights(
                &shown,
                CONFIG_KEY,
                "is not a string (the transformer's config.json, as `magcache export --gguf` writes it)",
            ))
        }
    };
    Ok(GgufHeader {
        architecture: architecture(&h, &shown)?,
        tensors: out,
        config,
    })
}

/// The metadata key under which `magcache export --gguf` stores the transformer's `config.json`
/// (a JSON string): sizes a GGUF file's shapes cannot tell (the heads) come back with the file.
/// city96's files have none; their config is inferred from the shapes.
pub const CONFIG_KEY: &str = "magcache.config";

/// What [`gguf_header`] reads: the architecture, each tensor's torch-order shape (names without
/// `model.diffusion_model.`, sorted) and the embedded `config.json` ([`CONFIG_KEY`]), if any.
pub struct GgufHeader {
    pub architecture: Option<String>,
    pub tensors: Vec<super::TensorShape>,
    pub config: Option<String>,
}

/// Refuses a GGUF file made for another family: `general.architecture` must be `expected`.
pub fn check_architecture(
    file: &Path,
    arch: Option<&str>,
    expected: &str,
    family: &str,
) -> Result<()> {
    match arch {
        Some(a) if a == expected => Ok(()),
        Some(a) => Err(Error::weights(
            file.display().to_string(),
            "general.architecture",
            format!("is `{a}`; family {family} reads `{expected}` files"),
        )),
        None => Err(Error::weights(
            file.display().to_string(),
            "general.architecture",
            format!("missing: family {family} reads `{expected}` files"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file claiming `claimed` tensors and describing the f32 `[4, 8]` tensors
    /// `(name, offset)`, with room for their data.
    fn gguf(claimed: u64, tensors: &[(&str, u64)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(claimed.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        for (name, offset) in tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(2u32.to_le_bytes());
            b.extend(8u64.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + 4 * 128, 0);
        b
    }

    fn load(bytes: Vec<u8>) -> Result<WeightStore> {
        let d = tempfile::tempdir().map_err(|e| Error::msg(e.to_string()))?;
        let f = d.path().join("t.gguf");
        std::fs::write(&f, bytes).map_err(|e| Error::msg(e.to_string()))?;
        WeightStore::load_gguf(&f).map(|(s, _)| s)
    }

    #[test]
    fn tensors_sharing_bytes_or_claimed_but_not_described_are_refused() {
        assert!(load(gguf(2, &[("a.weight", 0), ("b.weight", 128)])).is_ok());
        for (what, file, says) in [
            (
                "two tensors on one offset",
                gguf(2, &[("a.weight", 0), ("b.weight", 0)]),
                "overlap",
            ),
            (
                "a tensor inside another",
                gguf(2, &[("a.weight", 0), ("b.weight", 96)]),
                "overlap",
            ),
            (
                "one tensor twice",
                gguf(2, &[("a.weight", 0), ("a.weight", 128)]),
                "twice",
            ),
            (
                "one more tensor claimed than described",
                gguf(3, &[("a.weight", 0), ("b.weight", 128)]),
                "damaged header",
            ),
        ] {
            let e = load(file).err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(e.contains("t.gguf") && e.contains(says), "{what}: {e}");
        }
    }

    #[test]
    fn repacked_bytes_follow_candles_tile_layouts() {
        let avx512 = RepackCpu::X86 {
            vnni: true,
            amx: false,
        };
        let avx2 = RepackCpu::X86 {
            vnni: false,
            amx: false,
        };
        // Wan2.1-1.3B's FFN in: [8960, 1536]. A Q8_0 tile keeps the original's 34 bytes per 32.
        let q8 = (8960 * 1536 / 32) * 34;
        assert_eq!(repacked_bytes(avx512, GgmlDType::Q8_0, 8960, 1536), q8);
        // Without VNNI, Q8_0 is not repacked (AVX2's maddubs would overflow); Q4_K is (0.75 B/w).
        assert_eq!(repacked_bytes(avx2, GgmlDType::Q8_0, 8960, 1536), 0);
        assert_eq!(
            repacked_bytes(avx2, GgmlDType::Q4K, 8960, 1536),
            8960 * 1536 * 3 / 4
        );
        assert_eq!(
            repacked_bytes(avx2, GgmlDType::Q6K, 8960, 1536),
            8960 * 1536 * 5 / 4
        );
        // Shapes the tiles do not divide, and types never repacked, add nothing.
        assert_eq!(repacked_bytes(avx512, GgmlDType::Q8_0, 8960, 1000), 0);
        assert_eq!(repacked_bytes(avx512, GgmlDType::Q8_0, 8961, 1536), 0);
        assert_eq!(repacked_bytes(avx512, GgmlDType::Q5_0, 8960, 1536), 0);
        assert_eq!(
            repacked_bytes(RepackCpu::None, GgmlDType::Q4K, 8960, 1536),
            0
        );
        // aarch64 interleaves blocks of the original size.
        assert_eq!(
            repacked_bytes(RepackCpu::Arm, GgmlDType::Q8_0, 8960, 1536),
            q8
        );
    }
}
