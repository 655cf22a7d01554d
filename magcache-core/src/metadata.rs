//! Block metadata: where the hidden states and the (optional) encoder hidden states sit in a block's
//! input and output tuples. Strategies read and write block tuples only through it.

use crate::error::{Error, Result};
use candle_core::Tensor;

/// Positions of the streams in one block's input and output tuples.
///
/// A Wan block takes `(hidden, encoder, modulation, rope_cos, rope_sin)` and returns `(hidden,)`;
/// a FLUX double-stream block takes `(hidden, encoder, temb, cos, sin)` and returns
/// `(encoder, hidden)`: hidden output index 1, encoder output index 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMetadata {
    /// Short name of the block kind, for messages (`wan.block`, `flux.double`, ...).
    pub kind: &'static str,
    pub hidden_in: usize,
    pub encoder_in: Option<usize>,
    pub hidden_out: usize,
    /// `None` when the block returns only the hidden states.
    pub encoder_out: Option<usize>,
    /// Length of the output tuple.
    pub outputs: usize,
}

impl BlockMetadata {
    fn get<'a>(&self, t: &'a [Tensor], idx: usize, what: &str) -> Result<&'a Tensor> {
        t.get(idx).ok_or_else(|| {
            Error::Hooks(format!(
                "block `{}`: {what} index {idx} is outside a tuple of {} tensors",
                self.kind,
                t.len()
            ))
        })
    }
    /// The hidden states among the block's inputs.
    pub fn hidden_input<'a>(&self, inputs: &'a [Tensor]) -> Result<&'a Tensor> {
        self.get(inputs, self.hidden_in, "hidden input")
    }
    /// The encoder hidden states among the block's inputs, if the block has them.
    pub fn encoder_input<'a>(&self, inputs: &'a [Tensor]) -> Result<Option<&'a Tensor>> {
        self.encoder_in
            .map(|i| self.get(inputs, i, "encoder input"))
            .transpose()
    }
    /// The hidden states among the block's outputs.
    pub fn hidden_output<'a>(&self, outputs: &'a [Tensor]) -> Result<&'a Tensor> {
        self.get(outputs, self.hidden_out, "hidden output")
    }
    /// The encoder hidden states among the block's outputs, if the block returns them.
    pub fn encoder_output<'a>(&self, outputs: &'a [Tensor]) -> Result<Option<&'a Tensor>> {
        self.encoder_out
            .map(|i| self.get(outputs, i, "encoder output"))
            .transpose()
    }

    /// Builds an output tuple from the given streams. `encoder` is required when the block returns
    /// encoder states.
    pub fn make_output(&self, hidden: Tensor, encoder: Option<Tensor>) -> Result<Vec<Tensor>> {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.outputs];
        *slots.get_mut(self.hidden_out).ok_or_else(|| {
            Error::Hooks(format!(
                "block `{}`: hidden output index out of range",
                self.kind
            ))
        })? = Some(hidden);
        if let Some(i) = self.encoder_out {
            let e = encoder.ok_or_else(|| {
                Error::Hooks(format!(
                    "block `{}` returns encoder states but none were given",
                    self.kind
                ))
            })?;
            *slots.get_mut(i).ok_or_else(|| {
                Error::Hooks(format!(
                    "block `{}`: encoder output index out of range",
                    self.kind
                ))
            })? = Some(e);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| {
                    Error::Hooks(format!(
                        "block `{}`: output slot {i} is neither hidden nor encoder",
                        self.kind
                    ))
                })
            })
            .collect()
    }

    /// The output of a block that is passed through: its input streams, unchanged, in output order.
    pub fn pass_through(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let h = self.hidden_input(inputs)?.clone();
        let e = match self.encoder_out {
            Some(_) => Some(
                self.encoder_input(inputs)?
                    .ok_or_else(|| {
                        Error::Hooks(format!(
                            "block `{}` returns encoder states but takes none",
                            self.kind
                        ))
                    })?
                    .clone(),
            ),
            None => None,
        };
        self.make_output(h, e)
    }
}
