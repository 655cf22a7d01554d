//! # magcache-layers
//!
//! What every model family is built from, and nothing of any one family:
//! - checkpoints: [`weights`] (safetensors single files, sharded indexes, diffusers folders, GGUF;
//!   tensors read with `pread` as a model asks for them, so a streamed block is read when it runs),
//!   [`lora`] (adapters in the layouts people publish, merged at load or per streamed block),
//!   [`inputs`] (an inputs file), [`config_util`] (configs merged with `[model.overrides]`,
//!   pipeline folders);
//! - layers: [`nn`] (linear layers over dense or quantized weights, norms, the fused CPU attention
//!   and GELU, the row convolution), [`mmdit`] (the joint-attention double- and single-stream
//!   blocks of MMDiT families), [`dit`] (what a DiT holds around its chain: time embedding, rotary
//!   tables, the output layer, one joint chain call);
//! - sampling: [`scheduler`] (flow-matching Euler, shifts), [`unipc`] (UniPC bh2);
//! - the shared VAEs: [`autoencoder_kl`] (diffusers' `AutoencoderKL`, FLUX.1/FLUX.2 style) and
//!   [`autoencoder_kl_wan`] (the causal 3-D `AutoencoderKLWan`), with [`vae_common`] and the tile
//!   walk [`vae_tiles`]; [`picture`] (first frames and reference images);
//! - sizes: [`footprint`] (the size guard's arithmetic), [`random`] (seeded weights for presets).
//!
//! A family crate depends on this crate and on `magcache-core`, never on another family.

pub mod alloc;
pub mod autoencoder_kl;
pub mod autoencoder_kl_wan;
pub mod chain_model;
pub mod config_util;
pub mod dit;
pub mod env;
mod exif;
pub mod footprint;
pub mod generation;
pub mod inputs;
mod jpeg_walk;
pub mod lora;
pub mod mmdit;
pub mod nn;
pub mod packed_picture;
pub mod picture;
pub mod random;
pub mod run_basics;
pub mod scheduler;
pub mod stage;
pub mod unipc;
pub mod vae_common;
pub mod vae_tiles;
pub mod weights;
