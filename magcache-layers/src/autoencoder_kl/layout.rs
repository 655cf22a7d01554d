//! Checkpoint layouts of an image VAE: diffusers names, or BFL's `ae.safetensors` renamed to them;
//! attention projections stored as 1x1 convolutions or under deprecated names normalised.

use crate::weights::count_blocks;
use crate::weights::WeightStore;
use magcache_core::{Error, Result};

/// How the checkpoint names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaeLayout {
    /// diffusers `AutoencoderKL` (`encoder.down_blocks.0.resnets.0.conv1.weight`).
    Diffusers,
    /// BFL's `ae.safetensors` (`encoder.down.0.block.0.conv1.weight`, `decoder.up.3...`).
    Bfl,
}

/// The layout of a store's tensor names, or an error naming the file when it is neither.
pub fn detect_layout(store: &WeightStore) -> Result<VaeLayout> {
    let has = |p: &str| store.keys().any(|k| k.starts_with(p));
    if has("encoder.down_blocks.") || has("decoder.up_blocks.") || has("decoder.mid_block.") {
        return Ok(VaeLayout::Diffusers);
    }
    if has("encoder.down.") || has("decoder.up.") || has("decoder.mid.") {
        return Ok(VaeLayout::Bfl);
    }
    let mut sample: Vec<&String> = store.keys().collect();
    sample.sort();
    sample.truncate(3);
    Err(Error::weights(
        &store.origin,
        "encoder.conv_in.weight",
        format!(
            "not an image autoencoder checkpoint: neither diffusers AutoencoderKL names (encoder.down_blocks.*) nor BFL ae.safetensors names (encoder.down.*); first tensors: {sample:?}"
        ),
    ))
}

/// A BFL `ae.safetensors` name -> the diffusers `AutoencoderKL` name (`levels` = number of
/// resolution levels: BFL numbers the decoder's `up` levels from the highest resolution, diffusers
/// its `up_blocks` in execution order).
pub(super) fn bfl_to_diffusers(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let resnet_tail = |rest: &[&str]| -> String {
        rest.iter()
            .map(|p| {
                if *p == "nin_shortcut" {
                    "conv_shortcut"
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let num = |s: &str| s.parse::<usize>().ok();
    match parts.as_slice() {
        [side @ ("encoder" | "decoder"), level @ ("down" | "up"), i, kind, rest @ ..] => {
            let Some(i) = num(i) else {
                return name.to_string();
            };
            let (blocks, i) = if *level == "down" {
                ("down_blocks", i)
            } else {
                ("up_blocks", levels.saturating_sub(1).saturating_sub(i))
            };
            match (*kind, rest) {
                ("block", [j, tail @ ..]) => {
                    format!("{side}.{blocks}.{i}.resnets.{j}.{}", resnet_tail(tail))
                }
                ("downsample", tail) => {
                    format!("{side}.{blocks}.{i}.downsamplers.0.{}", tail.join("."))
                }
                ("upsample", tail) => {
                    format!("{side}.{blocks}.{i}.upsamplers.0.{}", tail.join("."))
                }
                _ => name.to_string(),
            }
        }
        [side @ ("encoder" | "decoder"), "mid", which, rest @ ..] => match *which {
            "block_1" => format!("{side}.mid_block.resnets.0.{}", resnet_tail(rest)),
            "block_2" => format!("{side}.mid_block.resnets.1.{}", resnet_tail(rest)),
            "attn_1" => {
                let (module, tail) = match rest {
                    [m, tail @ ..] => (*m, tail.join(".")),
                    [] => return name.to_string(),
                };
                let m = match module {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    other => other,
                };
                format!("{side}.mid_block.attentions.0.{m}.{tail}")
            }
            _ => name.to_string(),
        },
        [side @ ("encoder" | "decoder"), "norm_out", rest @ ..] => {
            format!("{side}.conv_norm_out.{}", rest.join("."))
        }
        _ => name.to_string(),
    }
}

/// Renames a BFL-layout store to diffusers names.
pub(super) fn rename_bfl(store: &mut WeightStore) -> Result<()> {
    let levels = count_blocks(store, "decoder.up.");
    store.rename(|k| bfl_to_diffusers(k, levels))
}

/// Attention projections stored as 1x1 convolutions (BFL, some converted checkpoints) and the
/// deprecated attention names (`query`/`key`/`value`/`proj_attn`) -> `to_q`.. linear weights.
pub(super) fn normalize_attention(store: &mut WeightStore) -> Result<()> {
    let old = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    if store.keys().any(|k| k.contains(".attentions.0.query.")) {
        store.rename(|k| {
            let mut k = k.to_string();
            if k.contains(".attentions.0.") {
                for (a, b) in old {
                    k = k.replace(a, b);
                }
            }
            k
        })?;
    }
    let convs: Vec<String> = store
        .keys()
        .filter(|k| {
            k.contains(".attentions.0.to_")
                && k.ends_with(".weight")
                && store.shape(k).map(|s| s.len()) == Some(4)
        })
        .cloned()
        .collect();
    for k in convs {
        if let Some(t) = store.take(&k)? {
            let (o, i, kh, kw) = t.dims4()?;
            if kh != 1 || kw != 1 {
                return Err(Error::weights(
                    &store.origin,
                    &k,
                    format!("has shape {:?}; an attention projection must be [C, C] or a 1x1 conv [C, C, 1, 1]", t.dims()),
                ));
            }
            store.insert(&k, t.reshape((o, i))?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfl_names_map_to_diffusers() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.norm1.weight",
                "decoder.up_blocks.0.resnets.2.norm1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.block_2.conv1.weight",
                "decoder.mid_block.resnets.1.conv1.weight",
            ),
            (
                "encoder.mid.attn_1.proj_out.bias",
                "encoder.mid_block.attentions.0.to_out.0.bias",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            ("decoder.norm_out.bias", "decoder.conv_norm_out.bias"),
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
        ];
        for (bfl, diff) in cases {
            assert_eq!(bfl_to_diffusers(bfl, 4), diff, "{bfl}");
        }
    }
}
