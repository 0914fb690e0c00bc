//! Tessera's command-line tools: argument parsing, progress bars and output; the work itself
//! happens in `tessera-models` and `tessera-runtime`.

/// Runs the `tessera` command line.
pub fn run() -> anyhow::Result<()> {
    Ok(())
}
