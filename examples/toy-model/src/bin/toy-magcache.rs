//! `toy-magcache`: the whole `magcache` runner (`run`, `compare`, `plan`, `calibrate`, `tune`,
//! `serve`, `list`, `export`) for the toy family, from a model crate outside the library.

fn main() -> std::process::ExitCode {
    toy_model::link();
    magcache_cli::main()
}
