//! The `tessera` binary: a thin entry point over `tessera-tools`.

use std::io::Write;

fn main() -> std::process::ExitCode {
    match tessera_tools::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): stop quietly, as Unix tools do.
        Err(err) if is_broken_pipe(&err) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
