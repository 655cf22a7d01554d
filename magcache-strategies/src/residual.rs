//! The residual MagCache and TeaCache keep per scope, and how a call reuses it.
//!
//! The residual is the chain's hidden output minus its hidden input of the last computed call. A
//! reused call returns the chain's input plus that residual (the only place it is added) with the
//! encoder stream passed through.

use magcache_core::candle_core::Tensor;
use magcache_core::maths::tensor_bytes;
use magcache_core::{BlockChain, Error, Result, ScopeKey, Streams};

#[derive(Debug, Default)]
pub struct ResidualCache {
    residual: Option<Tensor>,
}

impl ResidualCache {
    pub fn has_residual(&self) -> bool {
        self.residual.is_some()
    }

    /// Runs one call once the strategy decided: reuse (requires a residual) or compute every block
    /// and keep the new residual.
    pub fn run(
        &mut self,
        strategy: &str,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        reuse: bool,
    ) -> Result<Streams> {
        if !reuse {
            let input = x.hidden.clone();
            let out = chain.run(0..chain.num_blocks(), x)?;
            self.residual = Some((&out.hidden - &input)?);
            return Ok(out);
        }
        let res = self.residual.as_ref().ok_or_else(|| {
            Error::Hooks(format!(
                "{strategy} scope {scope}: reuse without a residual"
            ))
        })?;
        if res.dims() != x.hidden.dims() {
            return Err(Error::msg(format!(
                "{strategy} scope {scope}: cached residual has shape {:?} but the hidden states have {:?}; the input size changed within a generation",
                res.dims(),
                x.hidden.dims()
            )));
        }
        Ok(Streams {
            hidden: (&x.hidden + res)?,
            encoder: x.encoder,
        })
    }

    /// Bytes of the stored residual.
    pub fn bytes(&self) -> usize {
        self.residual.as_ref().map(tensor_bytes).unwrap_or(0)
    }
}
