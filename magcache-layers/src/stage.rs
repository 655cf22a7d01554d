//! Checks between a pipeline's stages (text encoding, denoising, decoding).

use candle_core::Tensor;
use magcache_core::Result;

/// `t`, the output of `stage` (`the text encoder`, `the VAE decode`, ...), holds only finite
/// values: an error naming the stage and `what` otherwise (the stage's weights overflow or hold
/// bad values; nothing is written).
pub fn check_stage(t: &Tensor, stage: &str, what: &str) -> Result<()> {
    magcache_core::finite::ensure_finite(
        t,
        stage,
        what,
        "the stage's weights overflow or hold bad values; nothing written",
    )
}

/// The decode stage of a prompted run: `decode(vae_dir)` timed as `decode` (the VAE loaded and
/// dropped inside it), its pixels checked finite naming `vae_dir`, the time pushed to `stages`.
pub fn decode_stage(
    stages: &mut Vec<magcache_core::runtime::progress::StageTime>,
    vae_dir: &std::path::Path,
    decode: impl FnOnce(&std::path::Path) -> Result<Tensor>,
) -> Result<Tensor> {
    let stage = magcache_core::runtime::progress::Stage::begin("decode");
    let pixels = decode(vae_dir)?;
    check_stage(
        &pixels,
        "the VAE decode",
        &format!("the decoded pixels (from {})", vae_dir.display()),
    )?;
    stages.push(stage.end());
    Ok(pixels)
}

/// A text stage's outputs checked finite ([`check_stage`]): `prompt_embeds` and, when there is
/// one, `negative_prompt_embeds`, named with the encoder (`Qwen3`) and its folder.
pub fn check_embeds(
    pos: &Tensor,
    neg: Option<&Tensor>,
    encoder: &str,
    dir: &std::path::Path,
) -> Result<()> {
    let te = dir.display();
    for (name, t) in [
        ("prompt_embeds", Some(pos)),
        ("negative_prompt_embeds", neg),
    ] {
        if let Some(t) = t {
            let what = format!("{name} ({encoder}, from {te})");
            check_stage(t, "the text encoder", &what)?;
        }
    }
    Ok(())
}
