//! `magcache`: run diffusion transformers with timestep caching, side by side with dense.

use std::process::ExitCode;

fn main() -> ExitCode {
    magcache_cli::link_all();
    magcache_cli::main()
}
