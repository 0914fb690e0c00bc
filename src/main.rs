//! The `tessera` binary: a thin entry point over `tessera-tools`.

fn main() -> std::process::ExitCode {
    match tessera_tools::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
