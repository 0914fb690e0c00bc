//! The WGSL sources, built into the binary, and their assembly into one module per pipeline.
//!
//! A kernel file is specialised by a preamble of `const` declarations (the "defines"); kernels
//! that read weights also get `quant.wgsl`, the in-register dequantisation of GGUF blocks.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::tensor::TEXEL_ROW;

/// Every kernel family's source, by file stem.
pub const SOURCES: &[(&str, &str)] = &[
    ("quant", include_str!("../../shaders/quant.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("matvec", include_str!("../../shaders/matvec.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    (
        "row_sum_subgroup",
        include_str!("../../shaders/row_sum_subgroup.wgsl"),
    ),
    (
        "row_sum_shared",
        include_str!("../../shaders/row_sum_shared.wgsl"),
    ),
    (
        "linear_rows",
        include_str!("../../shaders/linear_rows.wgsl"),
    ),
    (
        "matvec_rows",
        include_str!("../../shaders/matvec_rows.wgsl"),
    ),
    (
        "weight_texels",
        include_str!("../../shaders/weight_texels.wgsl"),
    ),
    ("rmsnorm", include_str!("../../shaders/rmsnorm.wgsl")),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    (
        "attention_rows",
        include_str!("../../shaders/attention_rows.wgsl"),
    ),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    ("argmax", include_str!("../../shaders/argmax.wgsl")),
    ("stats", include_str!("../../shaders/stats.wgsl")),
    (
        "train_matmul",
        include_str!("../../shaders/train_matmul.wgsl"),
    ),
    (
        "train_matmul_rows",
        include_str!("../../shaders/train_matmul_rows.wgsl"),
    ),
    ("optim", include_str!("../../shaders/optim.wgsl")),
    ("train_rope", include_str!("../../shaders/train_rope.wgsl")),
    (
        "train_attention",
        include_str!("../../shaders/train_attention.wgsl"),
    ),
    ("train_loss", include_str!("../../shaders/train_loss.wgsl")),
    (
        "train_elementwise",
        include_str!("../../shaders/train_elementwise.wgsl"),
    ),
    ("train_norm", include_str!("../../shaders/train_norm.wgsl")),
    (
        "train_reduce",
        include_str!("../../shaders/train_reduce.wgsl"),
    ),
    (
        "train_embedding",
        include_str!("../../shaders/train_embedding.wgsl"),
    ),
];

/// Kernel families whose source calls the block dequantisation in `quant.wgsl`.
const NEEDS_QUANT: &[&str] = &[
    "embedding",
    "matvec",
    "matmul",
    "linear_rows",
    "linear_rows_ux",
    "matvec_rows",
];

/// Kernel families that call `row_sum`.
const ROW_SUM: &[&str] = &["matvec"];

/// Families made from another's source by swapping one declaration: (family, source, the
/// declaration in the source, its replacement).
const DERIVED: &[(&str, &str, &str, &str)] = &[
    // The lane-per-row linear kernel with x in a uniform buffer of XV vec4s: on CPU devices a
    // uniform load that is the same for every lane is one scalar load, where a storage load
    // is one load per lane.
    (
        "linear_rows_ux",
        "linear_rows",
        "var<storage, read> x: array<vec4<f32>>;",
        "var<uniform> x: array<vec4<f32>, XV>;",
    ),
];

/// Returns the source of one file, or `None` for an unknown name.
///
/// With `TESSERA_SHADER_DIR` set, a file of that folder with the same name replaces the built-in
/// source: kernel work can then be tried without rebuilding. Each file is read once per process.
pub fn source(name: &str) -> Option<&'static str> {
    let builtin = SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)?;
    Some(override_from_env(name).unwrap_or(builtin))
}

fn override_from_env(name: &str) -> Option<&'static str> {
    static READ: OnceLock<Mutex<HashMap<String, Option<&'static str>>>> = OnceLock::new();
    let dir = std::env::var_os("TESSERA_SHADER_DIR")?;
    let mut read = READ.get_or_init(Default::default).lock().ok()?;
    if read.is_empty() && !std::path::Path::new(&dir).is_dir() {
        log::warn!(
            "TESSERA_SHADER_DIR={} is not a folder: the built-in kernels run",
            dir.to_string_lossy()
        );
    }
    *read.entry(name.to_string()).or_insert_with(|| {
        let path = std::path::Path::new(&dir).join(format!("{name}.wgsl"));
        if !path.exists() {
            return None;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                log::warn!(
                    "kernel source {name} from {} (TESSERA_SHADER_DIR)",
                    path.display()
                );
                // Read once and kept for the life of the process, as the built-in sources are.
                Some(Box::leak(text.into_boxed_str()))
            }
            Err(e) => {
                log::warn!(
                    "{} is unreadable ({e}): the built-in {name} runs",
                    path.display()
                );
                None
            }
        }
    })
}

/// Builds the full WGSL text of `family` specialised by `defines` (name, value as `u32`).
pub fn assemble(family: &str, defines: &[(&'static str, u32)]) -> Option<String> {
    let body = match DERIVED.iter().find(|(f, ..)| *f == family) {
        Some((_, base, from, to)) => {
            let text = source(base)?;
            if !text.contains(from) {
                return None;
            }
            std::borrow::Cow::Owned(text.replace(from, to))
        }
        None => std::borrow::Cow::Borrowed(source(family)?),
    };
    let mut text = String::new();
    // Families that sum over the threads of a row get `row_sum` by subgroup shuffles (define
    // SUBGROUP = 1; the device must have the subgroup feature, which naga takes without an
    // `enable` directive) or through workgroup memory.
    let subgroup = defines.contains(&("SUBGROUP", 1));
    for (name, value) in defines {
        text.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    if NEEDS_QUANT.contains(&family) {
        text.push_str(&weight_access(
            defines.contains(&("SWIGLU", 1)),
            defines.contains(&("W64", 1)),
            defines.contains(&("WTEX", 1)),
        ));
        text.push_str(source("quant")?);
        text.push('\n');
    }
    if ROW_SUM.contains(&family) {
        text.push_str(source(if subgroup {
            "row_sum_subgroup"
        } else {
            "row_sum_shared"
        })?);
        text.push('\n');
    }
    if family == "matvec_rows" {
        if defines.contains(&("WTEX", 1)) {
            text.push_str(&row_access_texels(defines.contains(&("SWIGLU", 1))));
        } else {
            text.push_str(ROW_ACCESS_BUFFERS);
        }
        text.push_str(if defines.contains(&("QKV", 1)) {
            QKV_OUTPUTS
        } else {
            NO_QKV_OUTPUTS
        });
        text.push_str(&norm_input(defines));
    }
    match defines.iter().find(|(name, _)| *name == "UNROLL") {
        Some(&(_, groups)) if groups > 0 => text.push_str(&unroll_groups(&body, groups)),
        _ => text.push_str(&body),
    }
    Some(text)
}

/// The line a kernel marks where `accumulate_group(b)` runs for each of its UNROLL groups.
const UNROLL_MARKER: &str = "// @unrolled-groups";

/// The line `matvec_rows` marks where `norm_x(i)` runs for each 4 elements of its UNROLL groups.
const SQUARES_MARKER: &str = "// @unrolled-squares";

/// `body` with its unroll marker replaced by one `accumulate_group(b);` per group, b constant,
/// and its squares marker by one `norm_x(i);` for each 4 elements of those groups:
/// on CPU devices a load whose index is a constant is one scalar load for all SIMD lanes, where an
/// index that depends on a loop counter is gathered lane by lane (llvmpipe asks whether an
/// index is uniform only by its form, not by its value).
fn unroll_groups(body: &str, groups: u32) -> String {
    let calls: String = (0..groups)
        .map(|b| format!("accumulate_group({b}u);\n"))
        .collect();
    let squares: String = (0..groups * 8)
        .map(|i| format!("norm_x({i}u);\n"))
        .collect();
    body.replace(UNROLL_MARKER, &calls)
        .replace(SQUARES_MARKER, &squares)
}

/// The weights' bindings and their accessors, which `quant.wgsl` and the kernels read them
/// through: `wload(i)`, their i-th 32-bit word; `wload4(i)`, their i-th 16 bytes (rows start at
/// multiples of 16 bytes: `DType::row_stride`); `wload4_second(i)`, the same for the second row
/// of a `matvec_rows` lane.
///
/// With `split` (define SWIGLU = 1) two weights read as one: the first `p.split` words from
/// binding 1, the rest from binding 4, where a lane's second row is (so its loads need no
/// choice of buffer).
///
/// With `wide` (define W64 = 1; the device needs 64-bit integers, which naga takes without an
/// `enable` directive) the bindings hold 64-bit words. llvmpipe runs a storage load whose
/// address differs between lanes as a loop over the SIMD lanes with a bounds check and a branch
/// for each component: 16 bytes as two 8-byte components cost about half the instructions of
/// four 4-byte ones (SmolLM2 Q4_1 decode on lavapipe, one thread: 17.7 -> 19.8 tokens/s).
fn weight_access(split: bool, wide: bool, texels: bool) -> String {
    if texels {
        return texel_weight_access(split);
    }
    // Word `i` and 16 bytes `i` of the binding `a`, as WGSL expressions.
    let word = |a: &str, i: &str| {
        if wide {
            format!("u32({a}[{i} >> 2u][({i} >> 1u) & 1u] >> (32u * ({i} & 1u)))")
        } else {
            format!("{a}[{i} >> 2u][{i} & 3u]")
        }
    };
    let quad = |a: &str, i: &str| {
        if wide {
            format!("halves({a}[{i}])")
        } else {
            format!("{a}[{i}]")
        }
    };
    let element = if wide { "vec2<u64>" } else { "vec4<u32>" };
    let mut text = format!("@group(0) @binding(1) var<storage, read> weights: array<{element}>;\n");
    if split {
        text += &format!("@group(0) @binding(4) var<storage, read> weights_b: array<{element}>;\n");
    }
    if wide {
        text += "fn halves(v: vec2<u64>) -> vec4<u32> {
    return vec4<u32>(u32(v.x), u32(v.x >> 32u), u32(v.y), u32(v.y >> 32u));
}
";
    }
    let (wload, second) = if split {
        (
            format!(
                "if (i < p.split) {{\n        return {};\n    }}\n    let j = i - p.split;\n    \
                 return {};",
                word("weights", "i"),
                word("weights_b", "j")
            ),
            quad("weights_b", "i - p.split / 4u"),
        )
    } else {
        (
            format!("return {};", word("weights", "i")),
            quad("weights", "i"),
        )
    };
    text += &format!(
        "fn wload(i: u32) -> u32 {{
    {wload}
}}
fn wload4(i: u32) -> vec4<u32> {{
    return {};
}}
fn wload4_second(i: u32) -> vec4<u32> {{
    return {second};
}}
",
        quad("weights", "i")
    );
    text
}

/// [`weight_access`] for weights bound as textures (define WTEX = 1, in `matvec_rows` only;
/// the runtime's `WeightTexels`, written by `weight_texels.wgsl`): 16 bytes a texel,
/// `TEXEL_ROW` texels a texture row, each group of 8 rows of W interleaved, so that texel j of
/// row r is at `(r / 8) 8 W + 8 j + r % 8` (W = `p.row_bytes / 16`). The binding's first byte
/// is texel `p.w_texel` of the rows laid end to end (`p.w_texel_b` for binding 4), at a row's
/// start. These accessors locate a row by division, correct for any kernel but slower than
/// [`row_access_texels`]'s.
fn texel_weight_access(split: bool) -> String {
    let (mask, shift) = (TEXEL_ROW - 1, TEXEL_ROW.trailing_zeros());
    let mut text = format!(
        "@group(0) @binding(1) var weights: texture_2d<u32>;
fn texel_at(t: u32) -> vec2<u32> {{
    return vec2<u32>(t & {mask}u, t >> {shift}u);
}}
// Where texel 0 of row r (counted from the buffer's first row) is.
fn tex_row(r: u32) -> u32 {{
    return (r >> 3u) * (p.row_bytes / 2u) + (r & 7u);
}}
// Texel i of the rows laid end to end from texel `first`.
fn tex_linear(first: u32, i: u32) -> u32 {{
    let w = p.row_bytes / 16u;
    let t = first + i;
    return tex_row(t / w) + 8u * (t % w);
}}
fn wload4(i: u32) -> vec4<u32> {{
    return textureLoad(weights, texel_at(tex_linear(p.w_texel, i)), 0);
}}
"
    );
    if split {
        text += "@group(0) @binding(4) var weights_b: texture_2d<u32>;
fn wload4_second(i: u32) -> vec4<u32> {
    return textureLoad(weights_b, texel_at(tex_linear(p.w_texel_b, i - p.split / 4u)), 0);
}
fn wload(i: u32) -> u32 {
    if (i < p.split) {
        return wload4(i >> 2u)[i & 3u];
    }
    return wload4_second(i >> 2u)[i & 3u];
}
";
    } else {
        text += "fn wload4_second(i: u32) -> vec4<u32> {
    return wload4(i);
}
fn wload(i: u32) -> u32 {
    return wload4(i >> 2u)[i & 3u];
}
";
    }
    text
}

/// How `matvec_rows` reads its lanes' rows 16 bytes at a time: `lane_rows(row0, row1)` takes
/// the byte offsets of the lane's two rows in its weights (the second past `4 p.split` with
/// SWIGLU = 1, in the up projection), then `wload4_row(second, j)` reads the 16 bytes j of the
/// first or second row from `p.w_offset` (the column window) on. From buffers, rows are
/// contiguous: word j is one on from word j - 1.
const ROW_ACCESS_BUFFERS: &str = "var<private> row_at0: u32;
var<private> row_at1: u32;
fn lane_rows(row0: u32, row1: u32) {
    row_at0 = (row0 + p.w_offset) >> 4u;
    row_at1 = (row1 + p.w_offset) >> 4u;
}
fn wload4_row(second: bool, j: u32) -> vec4<u32> {
    if (second) {
        return wload4_second(row_at1 + j);
    }
    return wload4(row_at0 + j);
}
";

/// [`ROW_ACCESS_BUFFERS`] from textures ([`texel_weight_access`]): the lane's rows are located
/// once, and texel j of a row is 8 on from texel j - 1. With `split`, the second row is in
/// binding 4.
fn row_access_texels(split: bool) -> String {
    let (second_row, second_load) = if split {
        (
            "p.w_texel_b / w + (row1 - 4u * p.split) / p.row_bytes",
            "textureLoad(weights_b, texel_at(row_at1 + 8u * j), 0)",
        )
    } else {
        (
            "p.w_texel / w + row1 / p.row_bytes",
            "textureLoad(weights, texel_at(row_at1 + 8u * j), 0)",
        )
    };
    format!(
        "var<private> row_at0: u32;
var<private> row_at1: u32;
fn lane_rows(row0: u32, row1: u32) {{
    let w = p.row_bytes / 16u;
    let window = 8u * (p.w_offset / 16u);
    row_at0 = tex_row(p.w_texel / w + row0 / p.row_bytes) + window;
    row_at1 = tex_row({second_row}) + window;
}}
fn wload4_row(second: bool, j: u32) -> vec4<u32> {{
    if (second) {{
        return {second_load};
    }}
    return textureLoad(weights, texel_at(row_at0 + 8u * j), 0);
}}
"
    )
}

/// The key and value outputs of `matvec_rows` with QKV = 1 (the caches) and `store_kv(seg, n,
/// value)`, which writes row n of the keys (seg 1) or values (seg 2). Declared only there, so
/// that the other specialisations bind no more than they use.
const QKV_OUTPUTS: &str = "@group(0) @binding(4) var<storage, read_write> y_k: array<f32>;
@group(0) @binding(5) var<storage, read_write> y_v: array<f32>;
fn store_kv(seg: u32, n: u32, value: f32) {
    if (n >= p.kv_n) {
        return;
    }
    if (seg == 1u) {
        y_k[p.k_y_offset + n] = value;
    } else {
        y_v[p.v_y_offset + n] = value;
    }
}
";

/// `matvec_rows`'s x where the kernel copies it into workgroup memory (XSHARED = 1, unrolled
/// kernels whose x fits): `share_x` copies it there, from where the unrolled groups' loads
/// (constant indices) are one scalar load for all SIMD lanes each. From the uniform binding,
/// llvmpipe checks every such load against the binding's size and branches on it: SmolLM2-135M
/// Q4_1 tg64 on lavapipe (two cores, five runs each, interleaved) 21.9-23.2 -> 26.3-27.8 t/s.
const X_SHARED: &str = "fn share_x(lid: u32) {
    for (var i = lid; i < XV; i += LANES) {
        x_shared[i] = x[i];
    }
    workgroupBarrier();
}
";

/// [`X_SHARED`] with the RMSNorm folded in (NORM = 1): `share_x` stores x times the norm's
/// weight, each lane adds the squares of the elements it copied, and every lane then sums the
/// lanes' sums into `xsq`.
const X_SHARED_NORM: &str = "var<workgroup> squares: array<vec4<f32>, LANES>;
fn share_x(lid: u32) {
    var s = vec4<f32>(0.0);
    for (var i = lid; i < XV; i += LANES) {
        let v = x[i];
        s = fma(v, v, s);
        x_shared[i] = v * norm_w[i];
    }
    squares[lid] = s;
    workgroupBarrier();
    for (var j = 0u; j < LANES; j++) {
        xsq += squares[j];
    }
}
";

/// The norm folded in without workgroup memory: `norm_x(i)`, called with constant indices,
/// keeps x[i] times the norm's weight in a private copy and adds its squares.
const X_PRIVATE_NORM: &str = "var<private> x_normed: array<vec4<f32>, XV>;
fn share_x(lid: u32) {}
fn norm_x(i: u32) {
    let v = x[i];
    xsq = fma(v, v, xsq);
    x_normed[i] = v * norm_w[i];
}
fn xin(i: u32) -> vec4<f32> {
    return x_normed[i];
}
";

/// How `matvec_rows` reads x: `xin(i)`, its i-th 4 elements, after `share_x(lid)`, which every
/// invocation calls first, and `norm_x(i)`, which the kernel calls for every i before the
/// groups where a norm is folded in. x comes from workgroup memory with XSHARED = 1
/// ([`X_SHARED`]), else from its uniform binding. With NORM = 1 it is x times the RMSNorm
/// weight's (bound after the kernel's other bindings: the up projection's with SWIGLU = 1, the
/// caches with QKV = 1), whose squares are summed into `xsq` ([`X_SHARED_NORM`],
/// [`X_PRIVATE_NORM`]; see `matvec_rows.wgsl`).
fn norm_input(defines: &[(&'static str, u32)]) -> String {
    let shared = defines.contains(&("XSHARED", 1));
    let mut text = String::new();
    if defines.contains(&("NORM", 1)) {
        let binding = if defines.contains(&("QKV", 1)) {
            6
        } else if defines.contains(&("SWIGLU", 1)) {
            5
        } else {
            4
        };
        text +=
            &format!("@group(0) @binding({binding}) var<uniform> norm_w: array<vec4<f32>, XV>;\n");
        if !shared {
            return text + X_PRIVATE_NORM;
        }
        text += X_SHARED_NORM;
    } else if shared {
        text += X_SHARED;
    } else {
        text += "fn share_x(lid: u32) {}\n";
    }
    let source = if shared {
        text += "var<workgroup> x_shared: array<vec4<f32>, XV>;\n";
        "x_shared"
    } else {
        "x"
    };
    text + &format!(
        "fn xin(i: u32) -> vec4<f32> {{\n    return {source}[i];\n}}\nfn norm_x(i: u32) {{}}\n"
    )
}

/// `store_kv` where there are no key and value outputs: never called.
const NO_QKV_OUTPUTS: &str = "fn store_kv(seg: u32, n: u32, value: f32) {}
";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    type Specialisation = (&'static str, Vec<(&'static str, u32)>);

    /// Every specialisation the runtime can ask for, by family.
    fn specialisations() -> Vec<Specialisation> {
        let mut all = Vec::new();
        for family in ["matvec", "matmul", "embedding", "linear_rows"] {
            for dtype in DType::ALL {
                let defines = vec![
                    ("WTYPE", dtype.ggml_id()),
                    ("BLOCK_BYTES", dtype.wgsl_block_bytes()),
                ];
                if family == "matvec" {
                    for (rows, subgroup) in [(4, 0), (4, 1), (8, 1), (2, 1)] {
                        let mut d = defines.clone();
                        d.extend([("WG", 64), ("ROWS", rows), ("SUBGROUP", subgroup)]);
                        all.push((family, d));
                    }
                    continue;
                }
                if family == "linear_rows" {
                    for tm in [1, 4, 8] {
                        let mut d = defines.clone();
                        d.push(("TM", tm));
                        all.push((family, d));
                    }
                    for tm in [1, 4] {
                        let mut d = defines.clone();
                        d.extend([("TM", tm), ("XV", 96 * tm)]);
                        all.push(("linear_rows_ux", d));
                    }
                    // A loop over the row's groups, and the row's 3 groups unrolled.
                    for (swiglu, rope, qkv, norm, unroll) in [
                        (0, 0, 0, 0, 0),
                        (1, 0, 0, 0, 0),
                        (0, 1, 0, 0, 3),
                        (1, 0, 0, 0, 3),
                        (0, 0, 1, 0, 0),
                        (0, 0, 1, 0, 3),
                        (1, 0, 0, 1, 0),
                        (1, 0, 0, 1, 3),
                        (0, 0, 1, 1, 3),
                        (0, 1, 0, 1, 3),
                    ] {
                        let mut d = defines.clone();
                        d.extend([
                            ("XV", 96),
                            ("SWIGLU", swiglu),
                            ("ROPE", rope),
                            ("QKV", qkv),
                            ("NORM", norm),
                            ("LANES", 16),
                            ("UNROLL", unroll),
                            ("XSHARED", 0),
                        ]);
                        all.push(("matvec_rows", d.clone()));
                        if unroll > 0 {
                            *d.last_mut().unwrap() = ("XSHARED", 1);
                            all.push(("matvec_rows", d));
                        }
                    }
                    continue;
                }
                all.push((family, defines));
            }
        }
        // Every kernel that reads weights again with them as 64-bit words, and the decode
        // mat-vec again with them bound as textures.
        let again = |all: &[Specialisation], define: &'static str, family: Option<&str>| {
            let picked = all
                .iter()
                .filter(|(f, _)| family.is_none_or(|want| want == *f));
            picked
                .map(|(f, defines)| (*f, [defines.as_slice(), &[(define, 1)]].concat()))
                .collect::<Vec<_>>()
        };
        let wide = again(&all, "W64", None);
        all.extend(wide);
        let texels = again(&all, "WTEX", Some("matvec_rows"));
        all.extend(texels);
        all.push((
            "weight_texels",
            vec![("TEXEL_SHIFT", TEXEL_ROW.trailing_zeros())],
        ));
        for family in ["rmsnorm", "softmax", "argmax"] {
            for wg in [1, 64, 256] {
                all.push((family, vec![("WG", wg)]));
            }
        }
        for hd in [32, 48, 64, 80, 128, 256] {
            for (wg, gqa) in [(8, 1), (32, 1), (8, 3), (4, 8)] {
                all.push(("attention", vec![("WG", wg), ("HD", hd), ("GQA", gqa)]));
            }
            all.push(("attention_rows", vec![("HD", hd)]));
        }
        for (ch, rs, t) in [(32, 8, 16), (32, 2, 8), (1, 1, 8)] {
            let defines = vec![("CH", ch), ("RS", rs), ("T", t), ("RT", 16), ("TB", 8)];
            all.push(("stats", defines));
        }
        all.push(("rope", vec![]));
        all.push(("elementwise", vec![]));
        all.push(("train_matmul", vec![]));
        for variant in [0, 1] {
            all.push((
                "train_matmul_rows",
                vec![("VARIANT", variant), ("AV", 4096)],
            ));
        }
        all.push(("optim", vec![]));
        all.push(("train_rope", vec![]));
        for hd in [1, 4, 6, 16, 64, 256] {
            let defines = vec![("HD", hd), ("WG", 32), ("BK", 16)];
            all.push(("train_attention", defines));
        }
        for wg in [1, 64] {
            all.push(("train_loss", vec![("WG", wg)]));
        }
        for op in 0..5 {
            for rank in 1..=4 {
                all.push(("train_elementwise", vec![("OP", op), ("RANK", rank)]));
            }
        }
        for (wg, tpr) in [(64, 1), (64, 8), (64, 64), (1, 1), (16, 16)] {
            for layer in [0, 1] {
                let defines = vec![("WG", wg), ("TPR", tpr), ("LAYER", layer)];
                all.push(("train_norm", defines));
            }
        }
        for wg in [1, 64, 256] {
            all.push(("train_reduce", vec![("WG", wg)]));
        }
        all.push(("train_embedding", vec![]));
        all
    }

    #[test]
    fn every_wgsl_file_validates_with_naga_in_every_specialisation() {
        let specs = specialisations();
        let included = ["quant", "row_sum_subgroup", "row_sum_shared"];
        for (name, _) in SOURCES.iter().filter(|(n, _)| !included.contains(n)) {
            assert!(
                specs.iter().any(|(f, _)| f == name),
                "{name}.wgsl is never validated"
            );
        }
        for (family, defines) in specs {
            let text = assemble(family, &defines).expect("known family");
            if let Err(e) = validate(&text) {
                panic!("{family} {defines:?} does not validate:\n{e}");
            }
        }
    }

    #[test]
    fn a_broken_kernel_is_reported_with_its_line() {
        let err = validate("fn main() { let x: u32 = 1.5; }").unwrap_err();
        assert!(
            err.contains("1.5") || err.contains("mismatch") || err.contains("type"),
            "{err}"
        );
    }
}
