//! Wan2.1 / Wan2.2: model, loading, presets, inputs, pipeline, and the family registrations.

pub mod config;
pub mod family;
pub mod footprint;
pub mod i2v;
pub mod image_encoder;
pub mod inputs;
pub mod keys;
pub mod load;
pub mod model;
pub mod pipeline;
pub mod pipeline_export;
pub mod presets;
pub mod prompted;
pub mod run;

pub use family::{Wan21, Wan22};
pub use inputs::build_inputs;
pub use presets::{WanPreset, WAN21_PRESETS, WAN22_PRESETS};
pub use run::WanRun;
