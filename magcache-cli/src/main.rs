//! `magcache`: run diffusion transformers with timestep caching, side by side with dense.

use std::process::ExitCode;

fn main() -> ExitCode {
    // The families this runner serves; the strategies come with the runner.
    magcache_models::link();
    magcache_cli::main()
}
