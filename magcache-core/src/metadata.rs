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
    /// Its streams, for listings: `hidden` or `hidden + encoder`.
    pub fn streams(&self) -> &'static str {
        if self.joint {
            "hidden + encoder"
        } else {
            "hidden"
        }
    }
}
