//! The WGSL sources, built into the binary, and their assembly into one module per pipeline.
//!
//! A kernel file is specialised by a preamble of `const` declarations (the "defines"); kernels
//! that read weights also get `quant.wgsl`, the in-register dequantisation of GGUF blocks.

/// Every kernel family's source, by file stem.
pub const SOURCES: &[(&str, &str)] = &[
    ("quant", include_str!("../../shaders/quant.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("matvec", include_str!("../../shaders/matvec.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("rmsnorm", include_str!("../../shaders/rmsnorm.wgsl")),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    ("argmax", include_str!("../../shaders/argmax.wgsl")),
];

/// Kernel families whose source calls the block dequantisation in `quant.wgsl`.
const NEEDS_QUANT: &[&str] = &["embedding", "matvec", "matmul"];

/// Returns the source of one file, or `None` for an unknown name.
pub fn source(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Builds the full WGSL text of `family` specialised by `defines` (name, value as `u32`).
pub fn assemble(family: &str, defines: &[(&'static str, u32)]) -> Option<String> {
    let body = source(family)?;
    let mut text = String::new();
    for (name, value) in defines {
        text.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    if NEEDS_QUANT.contains(&family) {
        text.push_str(source("quant")?);
        text.push('\n');
    }
    text.push_str(body);
    Some(text)
}

/// Parses and validates WGSL with naga, returning a readable error.
pub fn validate(text: &str) -> Result<naga::Module, String> {
    let module = naga::front::wgsl::parse_str(text).map_err(|e| e.emit_to_string(text))?;
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    validator
        .validate(&module)
        .map_err(|e| e.emit_to_string(text))?;
    Ok(module)
}
