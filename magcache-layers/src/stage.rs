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
