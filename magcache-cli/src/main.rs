//! `magcache`: run diffusion transformers with timestep caching, side by side with dense.

use std::process::ExitCode;

/// C's allocator; large blocks on 64-byte lines on CPUs with AMX or with `MAGCACHE_LINE_ALLOC=on`.
#[global_allocator]
static ALLOC: magcache_layers::alloc::LineAlloc = magcache_layers::alloc::LineAlloc;

fn main() -> ExitCode {
    // The families this runner serves; the strategies come with the runner.
    magcache_models::link();
    magcache_cli::main()
}
