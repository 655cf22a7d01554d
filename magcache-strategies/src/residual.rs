//! The residual MagCache and TeaCache keep per scope, and how a call reuses it.
//!
//! The residual is the last block's hidden output minus the first block's hidden input of the last
//! computed call. A reused call returns, at the head, the first block's input plus that residual (the
//! only place it is added) with the encoder stream passed through.

use magcache_core::candle_core::Tensor;
use magcache_core::maths::tensor_bytes;
use magcache_core::{Error, HeadAction, HookCx, Result};

#[derive(Debug, Default)]
pub struct ResidualCache {
    residual: Option<Tensor>,
    /// The first block's hidden input of the computed call in flight.
    head_input: Option<Tensor>,
    reusing: bool,
}

impl ResidualCache {
    pub fn has_residual(&self) -> bool {
        self.residual.is_some()
    }

    /// True while the current call reuses.
    pub fn is_reusing(&self) -> bool {
        self.reusing
    }

    /// The head's answer once the strategy decided: reuse (requires a residual) or compute.
    pub fn head(
        &mut self,
        strategy: &str,
        cx: &HookCx<'_>,
        inputs: &[Tensor],
        reuse: bool,
    ) -> Result<HeadAction> {
        let hidden = cx.meta.hidden_input(inputs)?;
        self.reusing = reuse;
        if !reuse {
            self.head_input = Some(hidden.clone());
            return Ok(HeadAction::Compute);
        }
        self.head_input = None;
        let res = self.residual.as_ref().ok_or_else(|| {
            Error::Hooks(format!(
                "{strategy} scope {}: reuse without a residual",
                cx.scope
            ))
        })?;
        if res.dims() != hidden.dims() {
            return Err(Error::msg(format!(
                "{strategy} scope {}: cached residual has shape {:?} but the hidden states have {:?}; the input size changed within a generation",
                cx.scope,
                res.dims(),
                hidden.dims()
            )));
        }
        let out = (hidden + res)?;
        Ok(HeadAction::Reuse(cx.meta.make_output(
            out,
            cx.meta.encoder_input(inputs)?.cloned(),
        )?))
    }

    /// Records the residual of a computed call from the last block's outputs.
    pub fn tail(&mut self, strategy: &str, cx: &HookCx<'_>, outputs: &[Tensor]) -> Result<()> {
        let input = self.head_input.take().ok_or_else(|| {
            Error::Hooks(format!(
                "{strategy} scope {}: tail ran without a head in the same call",
                cx.scope
            ))
        })?;
        self.residual = Some((cx.meta.hidden_output(outputs)? - input)?);
        Ok(())
    }

    /// Bytes of the stored residual.
    pub fn bytes(&self) -> usize {
        self.residual.as_ref().map(tensor_bytes).unwrap_or(0)
    }
}
