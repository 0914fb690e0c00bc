//! The `quant` program: Tessera's post-training quantization tools (`quant calibrate`, `quant
//! eval`, `quant stats`, `quant sweep`); the same as `tessera quant ...`.

fn main() -> std::process::ExitCode {
    tessera_tools::exit_code(tessera_tools::run_quant())
}
