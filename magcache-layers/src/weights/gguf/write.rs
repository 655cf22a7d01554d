//! Writing GGUF files (`magcache export --gguf`): every written block checked finite as stored.

use super::*;

/// ggml's type id of `t` (ggml.h), for writing.
fn ggml_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The quantizations a GGUF export can write, by their usual names (ggml's spelling, upper-case
/// in released file names: `Q8_0`, `Q4_K`).
const QUANTS: [(&str, GgmlDType); 10] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// A quantization a GGUF export can write, by its usual name (`q8_0`, `q4_k`, ...).
pub fn quant_type(name: &str) -> Option<GgmlDType> {
    let name = name.to_ascii_lowercase();
    QUANTS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The name of a quantization [`quant_type`] reads, as released files spell it (`Q4_K`, where
/// candle's is `Q4K`); other types by candle's name.
pub fn quant_name(t: GgmlDType) -> String {
    QUANTS
        .iter()
        .find(|(_, q)| *q == t)
        .map_or_else(|| format!("{t:?}"), |(n, _)| n.to_string())
        .to_uppercase()
}

/// The type a tensor is written in, by city96's rules: matrices whose rows are whole blocks in
/// `quant`, other matrices F16, everything else (biases, norms, modulation tables, the 5-D patch
/// embedding) F32.
fn written_type(shape: &[usize], quant: GgmlDType) -> GgmlDType {
    match shape {
        [_, cols] if cols % quant.block_size() == 0 => quant,
        [_, _] => GgmlDType::F16,
        _ => GgmlDType::F32,
    }
}

/// A GGUF string: its length (u64, little-endian), then its bytes.
fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A GGUF (version 3) file's start: magic, counts, and its metadata (architecture, quantization
/// version, the config where given).
fn metadata(arch: &str, config: Option<&str>, tensors: usize) -> Vec<u8> {
    let string = |v: &mut Vec<u8>, s: &str| v.extend_from_slice(&gguf_string(s));
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&(tensors as u64).to_le_bytes());
    v.extend_from_slice(&(2 + config.is_some() as u64).to_le_bytes());
    string(&mut v, "general.architecture");
    v.extend_from_slice(&8u32.to_le_bytes());
    string(&mut v, arch);
    string(&mut v, "general.quantization_version");
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&2u32.to_le_bytes());
    if let Some(c) = config {
        string(&mut v, super::CONFIG_KEY);
        v.extend_from_slice(&8u32.to_le_bytes());
        string(&mut v, c);
    }
    v
}

/// Writes `tensors` (names and torch-order shapes; values from `generate`, one tensor at a time,
/// never all held) as a GGUF file of architecture `arch` quantized to `quant`, with the
/// transformer's `config.json` text under [`super::CONFIG_KEY`] where `config` is given. Returns
/// the bytes written. `progress` gets a line every few GB.
pub fn write_gguf(
    path: &Path,
    arch: &str,
    config: Option<&str>,
    tensors: &[(String, Vec<usize>)],
    quant: GgmlDType,
    generate: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
    progress: &mut dyn FnMut(&str),
) -> Result<u64> {
    use std::io::Write;
    const ALIGN: u64 = 32;
    let shown = path.display().to_string();
    let io = |e: std::io::Error| Error::io(&shown, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = Counted {
        w: std::io::BufWriter::new(file),
        pos: 0,
    };
    let put = |w: &mut Counted, b: &[u8]| -> Result<()> {
        w.w.write_all(b).map_err(|e| Error::io(&shown, e))?;
        w.pos += b.len() as u64;
        Ok(())
    };
    put(&mut w, &metadata(arch, config, tensors.len()))?;
    let mut offset = 0u64;
    let mut plan = Vec::with_capacity(tensors.len());
    for (name, shape) in tensors {
        let ty = written_type(shape, quant);
        let elems: usize = shape.iter().product();
        let len = (elems / ty.block_size() * ty.type_size()) as u64;
        put(&mut w, &gguf_string(name))?;
        put(&mut w, &(shape.len() as u32).to_le_bytes())?;
        for d in shape.iter().rev() {
            put(&mut w, &(*d as u64).to_le_bytes())?;
        }
        put(&mut w, &ggml_id(ty).to_le_bytes())?;
        put(&mut w, &offset.to_le_bytes())?;
        plan.push((ty, len));
        offset = (offset + len).div_ceil(ALIGN) * ALIGN;
    }
    let pad = |at: u64| vec![0u8; (at.div_ceil(ALIGN) * ALIGN - at) as usize];
    let p = pad(w.pos);
    put(&mut w, &p)?;
    let mut since = 0u64;
    for ((name, shape), (ty, len)) in tensors.iter().zip(plan) {
        let t = generate(name, shape)?.to_dtype(candle_core::DType::F32)?;
        // Quantizing writes a NaN as 0 and an infinity as a clamped block: a file that looks
        // sound and is not. Refused, naming the tensor (a LoRA with a non-finite alpha, say).
        if !magcache_core::finite::all_finite(&t)? {
            return Err(Error::weights(
                &shown,
                name,
                format!(
                    "holds non-finite values ({}); nothing written",
                    magcache_core::finite::describe_non_finite(&t)?
                ),
            ));
        }
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let t = t.reshape((t.elem_count() / cols, cols))?;
        let q = candle_core::quantized::QTensor::quantize(&t, ty).map_err(|e| {
            let e = magcache_core::error::candle_text(e);
            Error::weights(&shown, name, format!("{ty:?}: {e}"))
        })?;
        let data = q.data()?;
        if data.len() as u64 != len {
            return Err(Error::weights(
                &shown,
                name,
                format!("{ty:?} gave {} bytes, {len} expected", data.len()),
            ));
        }
        check_written(ty, &data, &shown, name)?;
        put(&mut w, &data)?;
        let p = pad(len);
        put(&mut w, &p)?;
        since += len;
        if since > 2_000_000_000 {
            progress(&format!("{shown}: {:.1} GB written", w.pos as f64 / 1e9));
            since = 0;
        }
    }
    w.w.flush().map_err(io)?;
    Ok(w.pos)
}

/// A finite tensor can still overflow what a GGUF file stores: f16 values, and the f16 scale of a
/// quantized block (its largest value over 127 for Q8_0): checked as written, naming the tensor.
fn check_written(ty: GgmlDType, data: &[u8], shown: &str, name: &str) -> Result<()> {
    check_finite_blocks(ty, data, shown, name).map_err(|_| {
        Error::weights(
            shown,
            name,
            format!("overflows {ty:?} (a value or a block scale past f16's 65504 as written); nothing written"),
        )
    })
}

/// A writer counting its bytes.
struct Counted {
    w: std::io::BufWriter<std::fs::File>,
    pos: u64,
}
