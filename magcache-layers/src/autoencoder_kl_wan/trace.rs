//! Recording a Wan VAE pass's intermediate outputs (parity tests against diffusers).

use candle_core::Tensor;
use magcache_core::Result;
use std::collections::BTreeMap;

/// Intermediate outputs of an encode or decode, by diffusers module name (`encoder.mid_block`,
/// `encoder`, `post_quant_conv`, `decoder.conv_in`, `decoder.mid_block`, `decoder.up_blocks.{i}`,
/// `decoder`), the chunks concatenated along time.
#[derive(Default)]
pub struct VaeTrace {
    pub(super) chunks: BTreeMap<String, Vec<Tensor>>,
}

impl VaeTrace {
    /// The recorded output of module `name` as `[B, C, F, H, W]`, if recorded.
    pub fn get(&self, name: &str) -> Result<Option<Tensor>> {
        match self.chunks.get(name) {
            None => Ok(None),
            Some(parts) => Ok(Some(
                Tensor::cat(parts, 1)?
                    .permute((0, 2, 1, 3, 4))?
                    .contiguous()?,
            )),
        }
    }

    /// The names recorded.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.chunks.keys()
    }
}

pub(super) fn record(trace: &mut Option<&mut VaeTrace>, name: &str, x: &Tensor) {
    if let Some(t) = trace.as_deref_mut() {
        t.chunks
            .entry(name.to_string())
            .or_default()
            .push(x.clone());
    }
}
