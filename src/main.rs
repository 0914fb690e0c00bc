//! The `tessera` binary: a thin entry point over `tessera-tools`.

fn main() -> std::process::ExitCode {
    tessera_tools::exit_code(tessera_tools::run())
}
