// In-register dequantisation of GGUF weight rows, shared by the kernels that read weights.
//
// The including kernel declares `weights: array<u32>` (the tensor's GGUF bytes, little-endian
// words) and the defines WTYPE (GGML type id: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0) and
// BLOCK_BYTES (bytes per 32 elements). Rows are addressed by their byte offset; Q8_0 and Q4_0
// blocks are only 2-byte aligned, so words are read through `read_u32_at`.

// The 32-bit word at a 2-byte-aligned byte offset. Types whose blocks keep 4-byte alignment
// read one word; the others read two and shift, without a branch that would split SIMD lanes.
fn read_u32_at(byte: u32) -> u32 {
    let w = byte >> 2u;
    if (BLOCK_BYTES % 4u == 0u && WTYPE != 1u) {
        return weights[w];
    }
    let shift = (byte & 2u) * 8u;
    let lo = weights[w] >> shift;
    let hi = select(0u, weights[w + 1u] << (32u - shift), shift != 0u);
    return lo | hi;
}

// The f16 at a 2-byte-aligned byte offset, widened to f32.
fn read_f16_at(byte: u32) -> f32 {
    let word = weights[byte >> 2u];
    return unpack2x16float(word >> ((byte & 2u) * 8u)).x;
}

// Four signed bytes of a word, as f32.
fn i8x4(q: u32) -> vec4<f32> {
    let s = bitcast<i32>(q);
    return vec4<f32>(
        f32(extractBits(s, 0u, 8u)),
        f32(extractBits(s, 8u, 8u)),
        f32(extractBits(s, 16u, 8u)),
        f32(extractBits(s, 24u, 8u)),
    );
}

// Four unsigned nibbles, taken from the low nibble of each byte of `q`.
fn u4x4(q: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(q & 15u),
        f32((q >> 8u) & 15u),
        f32((q >> 16u) & 15u),
        f32((q >> 24u) & 15u),
    );
}

// Elements 4g .. 4g+3 of the row that starts at byte `row`. For F32 and F16 a row of k elements
// may end inside the last group: the caller masks elements at or past k.
fn dequant4(row: u32, g: u32) -> vec4<f32> {
    if (WTYPE == 0u) {
        let w = (row >> 2u) + g * 4u;
        return bitcast<vec4<f32>>(vec4<u32>(weights[w], weights[w + 1u], weights[w + 2u], weights[w + 3u]));
    }
    if (WTYPE == 1u) {
        let b = row + g * 8u;
        return vec4<f32>(unpack2x16float(read_u32_at(b)), unpack2x16float(read_u32_at(b + 4u)));
    }
    let block = row + (g >> 3u) * BLOCK_BYTES;
    let j = g & 7u;
    if (WTYPE == 8u) {
        // Q8_0: f16 d, then 32 signed bytes; x = d * q.
        return read_f16_at(block) * i8x4(read_u32_at(block + 2u + 4u * j));
    }
    if (WTYPE == 2u) {
        // Q4_0: f16 d, then 16 bytes; low nibbles are elements 0..15, high ones 16..31;
        // x = d * (q - 8).
        let q = read_u32_at(block + 2u + 4u * (j & 3u)) >> ((j >> 2u) * 4u);
        return read_f16_at(block) * (u4x4(q) - 8.0);
    }
    // Q4_1: f16 d, f16 m, then 16 bytes laid out as in Q4_0; x = d * q + m.
    let dm = unpack2x16float(read_u32_at(block));
    let q = read_u32_at(block + 4u + 4u * (j & 3u)) >> ((j >> 2u) * 4u);
    return dm.x * u4x4(q) + dm.y;
}

// The 32 elements of the block of a quantised type that starts at byte `block`, as 8 vec4s
// (elements 4j .. 4j+3 in slot j), with as few word loads as the layout allows: a Q4_1 block is
// 5 words; Q4_0 and Q8_0 blocks, which may start at a 2-byte offset, are read as 5 and 9 whole
// words and shifted. Invocations that each own a row pay one load per word, so this matters
// more than arithmetic on devices that run invocations as SIMD lanes.
fn dequant_block(block: u32) -> array<vec4<f32>, 8> {
    var out: array<vec4<f32>, 8>;
    let base = block >> 2u;
    let odd = (block & 2u) != 0u;
    if (WTYPE == 3u) {
        let dm = unpack2x16float(weights[base]);
        for (var j = 0u; j < 4u; j++) {
            let q = weights[base + 1u + j];
            out[j] = dm.x * u4x4(q) + dm.y;
            out[j + 4u] = dm.x * u4x4(q >> 4u) + dm.y;
        }
        return out;
    }
    if (WTYPE == 2u) {
        let w0 = weights[base];
        let d = unpack2x16float(select(w0, w0 >> 16u, odd)).x;
        var lo = w0;
        for (var j = 0u; j < 4u; j++) {
            let hi = weights[base + 1u + j];
            let q = select((lo >> 16u) | (hi << 16u), hi, odd);
            out[j] = d * (u4x4(q) - 8.0);
            out[j + 4u] = d * (u4x4(q >> 4u) - 8.0);
            lo = hi;
        }
        return out;
    }
    if (WTYPE == 8u) {
        let w0 = weights[base];
        let d = unpack2x16float(select(w0, w0 >> 16u, odd)).x;
        var lo = w0;
        for (var j = 0u; j < 8u; j++) {
            let hi = weights[base + 1u + j];
            out[j] = d * i8x4(select((lo >> 16u) | (hi << 16u), hi, odd));
            lo = hi;
        }
        return out;
    }
    // F32 and F16 (blocks of 32 elements): through the general path.
    for (var j = 0u; j < 8u; j++) {
        out[j] = dequant4(block, j);
    }
    return out;
}
