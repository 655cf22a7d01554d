//! Block metadata: what kind of block sits at a place of the chain and which streams it updates.
//! What flows through a block (and through its hooks) is typed: [`crate::Streams`], the hidden
//! states and, for joint blocks, the encoder states; the block's other arguments (timestep
//! modulation, rotary tables, context) are the model's own and never pass through hooks.

/// One block kind of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMetadata {
    /// Short name of the block kind, for messages (`wan.block`, `flux.double`, ...).
    pub kind: &'static str,
    /// Whether the block updates an encoder (text) stream beside the hidden one (FLUX's double and
    /// single blocks); a block that only reads its context (Wan's cross-attention) does not.
    pub joint: bool,
}

impl BlockMetadata {
    /// A kind of block that updates the hidden stream only (its context is constant conditioning).
    pub const fn hidden(kind: &'static str) -> Self {
        BlockMetadata { kind, joint: false }
    }

    /// A kind of block that updates the hidden and the encoder streams (joint attention).
    pub const fn joint(kind: &'static str) -> Self {
        BlockMetadata { kind, joint: true }
    }

    /// The kind of every block of a chain made of `runs`: `n` blocks of each kind, in order
    /// (FLUX: the double blocks, then the single blocks).
    pub fn chain(runs: &[(BlockMetadata, usize)]) -> Vec<BlockMetadata> {
        runs.iter()
            .flat_map(|&(kind, n)| std::iter::repeat_n(kind, n))
            .collect()
    }

    /// Its streams, for listings: `hidden` or `hidden + encoder`.
    pub fn streams(&self) -> &'static str {
        if self.joint {
            "hidden + encoder"
        } else {
            "hidden"
        }
    }
}
