// In-register dequantisation of GGUF weight rows, shared by the kernels that read weights.
//
// The weights (the tensor's GGUF bytes as little-endian words) are read through `wload`, which
// the runtime declares with their binding before this file. The including kernel gets the
// defines WTYPE (GGML type
// id: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K,
// 14 Q6_K, 20 IQ4_NL) and BLOCK_BYTES (bytes per GGUF block: 32 elements, or a 256-element
// super-block for K-quants; 32 elements of F32/F16).
// Rows are addressed by their byte offset and read in groups of 32 elements (`dequant_group`,
// group b of a K-quant row is sub-block b % 8 of super-block b / 8) or of 4 (`dequant4`).
// Blocks of Q4_0, Q5_0, Q8_0, IQ4_NL, Q3_K and Q6_K are only 2-byte aligned, so words are read
// at 2-byte offsets through `read_u32_at` and `words8`. Layouts: ggml's `ggml-common.h`.

// True for the K-quants, whose 32-element groups live inside 256-element super-blocks.
const K_QUANT: bool = WTYPE >= 10u && WTYPE <= 14u;

// IQ4_NL's 16 non-linear levels (`kvalues_iq4nl` in ggml: -127, -104, -83, -65, -49, -35, -22,
// -10, 1, 13, 25, 38, 53, 69, 89, 113) as signed bytes packed four to a word. Selecting among
// words keeps the lookup in registers; an indexed constant array costs a copy per call.
const IQ4_NL_LEVELS_0: u32 = 0xbfad9881u;
const IQ4_NL_LEVELS_1: u32 = 0xf6eaddcfu;
const IQ4_NL_LEVELS_2: u32 = 0x26190d01u;
const IQ4_NL_LEVELS_3: u32 = 0x71594535u;

// The 32-bit word at a 2-byte-aligned byte offset. Types whose blocks keep 4-byte alignment
// read one word; the others read two and shift, without a branch that would split SIMD lanes.
fn read_u32_at(byte: u32) -> u32 {
    let w = byte >> 2u;
    if (BLOCK_BYTES % 4u == 0u && WTYPE != 1u) {
        return wload(w);
    }
    let shift = (byte & 2u) * 8u;
    let lo = wload(w) >> shift;
    let hi = select(0u, wload(w + 1u) << (32u - shift), shift != 0u);
    return lo | hi;
}

// The f16 at a 2-byte-aligned byte offset, widened to f32.
fn read_f16_at(byte: u32) -> f32 {
    let word = wload(byte >> 2u);
    return unpack2x16float(word >> ((byte & 2u) * 8u)).x;
}

// Eight consecutive words from a 2-byte-aligned byte offset: eight loads for 4-byte-aligned
// types, nine shifted into place for the others.
fn words8(byte: u32) -> array<u32, 8> {
    var out: array<u32, 8>;
    let base = byte >> 2u;
    if (BLOCK_BYTES % 4u == 0u) {
        for (var j = 0u; j < 8u; j++) {
            out[j] = wload(base + j);
        }
        return out;
    }
    let odd = (byte & 2u) != 0u;
    var lo = wload(base);
    for (var j = 0u; j < 8u; j++) {
        let hi = wload(base + 1u + j);
        out[j] = select(lo, (lo >> 16u) | (hi << 16u), odd);
        lo = hi;
    }
    return out;
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

// Four unsigned bytes of a word, as f32. The bytes are converted as signed integers, which they
// fit: CPU devices convert signed integers in one instruction and unsigned ones in several.
fn u8x4(q: u32) -> vec4<f32> {
    let bytes = (vec4<u32>(q) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u);
    return vec4<f32>(bitcast<vec4<i32>>(bytes));
}

// Four unsigned nibbles, taken from the low nibble of each byte of `q`.
fn u4x4(q: u32) -> vec4<f32> {
    return u8x4(q & 0x0f0f0f0fu);
}

// IQ4_NL levels of the low nibbles of the bytes of `q`.
fn iq4x4(q: u32) -> vec4<f32> {
    let code = (vec4<u32>(q) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u);
    let upper = (code & vec4<u32>(4u)) != vec4<u32>(0u);
    let low_words = select(vec4<u32>(IQ4_NL_LEVELS_0), vec4<u32>(IQ4_NL_LEVELS_1), upper);
    let high_words = select(vec4<u32>(IQ4_NL_LEVELS_2), vec4<u32>(IQ4_NL_LEVELS_3), upper);
    let words = select(low_words, high_words, (code & vec4<u32>(8u)) != vec4<u32>(0u));
    let bytes = bitcast<vec4<i32>>(words << ((vec4<u32>(3u) - (code & vec4<u32>(3u))) * 8u));
    return vec4<f32>(bytes >> vec4<u32>(24u));
}

// The low four bits of `bits` spread to bit 0 of each byte.
fn bits4(bits: u32) -> u32 {
    return (bits & 1u) | ((bits & 2u) << 7u) | ((bits & 4u) << 14u) | ((bits & 8u) << 21u);
}

// Q5_0 and Q5_1: elements 4j .. 4j+3 of a block from its packed fifth bits `qh` (bit e for
// element e) and the word of nibbles `qs` that holds them.
fn q5x4(qh: u32, qs: u32, j: u32) -> vec4<f32> {
    let low = (qs >> ((j >> 2u) * 4u)) & 0x0f0f0f0fu;
    return u8x4(low | (bits4(qh >> (4u * j)) << 4u));
}

// Q2_K sub-block s of the super-block at byte `sb`: (d * scale, dmin * min) of its first 16
// elements in xy and of its last 16 in zw. Scales sit in bytes 0..16, one byte per 16
// elements (scale in the low nibble, min in the high one); d and dmin at byte 80.
fn q2k_scales(sb: u32, s: u32) -> vec4<f32> {
    let dm = unpack2x16float(wload((sb + 80u) >> 2u));
    let sc = wload((sb >> 2u) + (s >> 1u)) >> ((s & 1u) * 16u);
    let sc0 = sc & 255u;
    let sc1 = (sc >> 8u) & 255u;
    return vec4<f32>(
        dm.x * f32(sc0 & 15u),
        dm.y * f32(sc0 >> 4u),
        dm.x * f32(sc1 & 15u),
        dm.y * f32(sc1 >> 4u),
    );
}

// Q3_K sub-block s: d * (scale - 32) of its two halves of 16. The 16 six-bit scales at byte 96
// keep their low nibbles in bytes 0..8 (scales 8..15 in the high nibbles) and their top bits in
// bytes 8..12 (two bits per scale, scale i at bits 2 (i / 4)); d is at byte 108.
fn q3k_scales(sb: u32, s: u32) -> vec2<f32> {
    let d = read_f16_at(sb + 108u);
    let low = read_u32_at(sb + 96u + 2u * (s & 3u)) >> (4u * (s >> 2u));
    let high = read_u32_at(sb + 104u + 2u * (s & 1u)) >> (2u * (s >> 1u));
    let sc0 = i32((low & 15u) | ((high & 3u) << 4u)) - 32;
    let sc1 = i32(((low >> 8u) & 15u) | (((high >> 8u) & 3u) << 4u)) - 32;
    return vec2<f32>(d * f32(sc0), d * f32(sc1));
}

// Q4_K and Q5_K sub-block s: (d * scale, dmin * min). d and dmin fill word 0; the 6-bit
// scales and mins of sub-blocks 0..3 are the low bits of bytes 4..8 and 8..12, those of 4..7
// take their low nibbles from bytes 12..16 and their top two bits from the bytes of 0..3.
fn q45k_scales(sb: u32, s: u32) -> vec2<f32> {
    let base = sb >> 2u;
    let dm = unpack2x16float(wload(base));
    let shift = 8u * (s & 3u);
    let a = (wload(base + 1u) >> shift) & 255u;
    let b = (wload(base + 2u) >> shift) & 255u;
    let c = (wload(base + 3u) >> shift) & 255u;
    let high = s >= 4u;
    let sc = select(a & 63u, (c & 15u) | ((a >> 6u) << 4u), high);
    let m = select(b & 63u, (c >> 4u) | ((b >> 6u) << 4u), high);
    return vec2<f32>(dm.x * f32(sc), dm.y * f32(m));
}

// Q6_K sub-block s: d * scale of its two halves of 16. The signed scales sit at byte 192, one
// per 16 elements; d is at byte 208.
fn q6k_scales(sb: u32, s: u32) -> vec2<f32> {
    let d = read_f16_at(sb + 208u);
    let sc = bitcast<i32>(read_u32_at(sb + 192u + 2u * s));
    return vec2<f32>(d * f32(extractBits(sc, 0u, 8u)), d * f32(extractBits(sc, 8u, 8u)));
}

// K-quants: elements 4j .. 4j+3 of sub-block s of the super-block at byte `sb`.
// Q2_K and Q3_K: each 32-byte run of 2-bit codes serves 128 elements, 2 bits per sub-block;
// Q3_K's high bits are bit s of bytes 0..32, and a clear bit subtracts 4. Q4_K and Q5_K: each
// 32-byte run of nibbles serves two sub-blocks, low nibbles first; Q5_K's fifth bits are bit s
// of bytes 16..48. Q6_K: each half of 128 elements has 64 bytes of low nibbles and 32 bytes of
// 2-bit high parts; its quarter t takes nibble t / 2 of bytes 32 (t % 2) .. and bits 2t.
fn dequant4_k(sb: u32, s: u32, j: u32) -> vec4<f32> {
    let half = j >> 2u;
    if (WTYPE == 10u) {
        let dm = q2k_scales(sb, s);
        let q = (read_u32_at(sb + 16u + 32u * (s >> 2u) + 4u * j) >> (2u * (s & 3u))) & 0x03030303u;
        let dl = select(dm.xy, dm.zw, half == 1u);
        return dl.x * u8x4(q) - dl.y;
    }
    if (WTYPE == 11u) {
        let dl = q3k_scales(sb, s)[half];
        let hm = (read_u32_at(sb + 4u * j) >> s) & 0x01010101u;
        let q = (read_u32_at(sb + 32u + 32u * (s >> 2u) + 4u * j) >> (2u * (s & 3u))) & 0x03030303u;
        return dl * (u8x4(q | (hm << 2u)) - 4.0);
    }
    if (WTYPE == 12u || WTYPE == 13u) {
        let dm = q45k_scales(sb, s);
        let qs_at = select(16u, 48u, WTYPE == 13u);
        var q = (wload((sb + qs_at + 32u * (s >> 1u) + 4u * j) >> 2u) >> (4u * (s & 1u))) & 0x0f0f0f0fu;
        if (WTYPE == 13u) {
            q |= ((wload((sb + 16u + 4u * j) >> 2u) >> s) & 0x01010101u) << 4u;
        }
        return dm.x * u8x4(q) - dm.y;
    }
    // Q6_K.
    let dl = q6k_scales(sb, s)[half];
    let h = s >> 2u;
    let t = s & 3u;
    let low = (read_u32_at(sb + 64u * h + 32u * (t & 1u) + 4u * j) >> (4u * (t >> 1u))) & 0x0f0f0f0fu;
    let high = (read_u32_at(sb + 128u + 32u * h + 4u * j) >> (2u * t)) & 0x03030303u;
    return dl * (u8x4(low | (high << 4u)) - 32.0);
}

// Elements 4g .. 4g+3 of the row that starts at byte `row`. For F32 and F16 a row of k elements
// may end inside the last group: the caller masks elements at or past k.
fn dequant4(row: u32, g: u32) -> vec4<f32> {
    if (WTYPE == 0u) {
        let w = (row >> 2u) + g * 4u;
        return bitcast<vec4<f32>>(vec4<u32>(wload(w), wload(w + 1u), wload(w + 2u), wload(w + 3u)));
    }
    if (WTYPE == 1u) {
        let b = row + g * 8u;
        return vec4<f32>(unpack2x16float(read_u32_at(b)), unpack2x16float(read_u32_at(b + 4u)));
    }
    if (K_QUANT) {
        return dequant4_k(row + (g >> 6u) * BLOCK_BYTES, (g >> 3u) & 7u, g & 7u);
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
    if (WTYPE == 20u) {
        // IQ4_NL: nibbles as in Q4_0; x = d * level(q).
        let q = read_u32_at(block + 2u + 4u * (j & 3u)) >> ((j >> 2u) * 4u);
        return read_f16_at(block) * iq4x4(q);
    }
    if (WTYPE == 6u) {
        // Q5_0: f16 d, 4 bytes of fifth bits, then nibbles as in Q4_0; x = d * (q - 16).
        let q = q5x4(read_u32_at(block + 2u), read_u32_at(block + 6u + 4u * (j & 3u)), j);
        return read_f16_at(block) * (q - 16.0);
    }
    if (WTYPE == 7u) {
        // Q5_1: f16 d, f16 m, 4 bytes of fifth bits, then nibbles; x = d * q + m.
        let base = block >> 2u;
        let dm = unpack2x16float(wload(base));
        return dm.x * q5x4(wload(base + 1u), wload(base + 2u + (j & 3u)), j) + dm.y;
    }
    // Q4_1: f16 d, f16 m, then 16 bytes laid out as in Q4_0; x = d * q + m.
    let dm = unpack2x16float(read_u32_at(block));
    let q = read_u32_at(block + 4u + 4u * (j & 3u)) >> ((j >> 2u) * 4u);
    return dm.x * u4x4(q) + dm.y;
}

// Byte offset of the 32 bytes of codes that sub-block s of a K-quant super-block reads: 2-bit
// codes (Q2_K, Q3_K) serve 4 sub-blocks per run, nibbles (Q4_K, Q5_K) 2, Q6_K's low nibbles 2
// (sub-blocks s and s + 2 of a half).
fn k_codes_at(sb: u32, s: u32) -> u32 {
    switch (WTYPE) {
        case 10u: { return sb + 16u + 32u * (s >> 2u); }
        case 11u: { return sb + 32u + 32u * (s >> 2u); }
        case 12u: { return sb + 16u + 32u * (s >> 1u); }
        case 13u: { return sb + 48u + 32u * (s >> 1u); }
        default: { return sb + 64u * (s >> 2u) + 32u * (s & 1u); }
    }
}

// True for K-quants with a second run of bits per sub-block: Q3_K's high bits, Q5_K's fifth
// bits (both shared by all 8 sub-blocks), Q6_K's 2-bit high parts (shared by a half).
const K_HIGH_BITS: bool = WTYPE == 11u || WTYPE == 13u || WTYPE == 14u;

// Byte offset of the 32 bytes of high bits that sub-block s reads (see `K_HIGH_BITS`).
fn k_high_bits_at(sb: u32, s: u32) -> u32 {
    switch (WTYPE) {
        case 11u: { return sb; }
        case 13u: { return sb + 16u; }
        default: { return sb + 128u + 32u * (s >> 2u); }
    }
}

// Sub-block s of the K-quant super-block at byte `sb` from its loaded code and high-bit words.
fn decode_k(sb: u32, s: u32, codes: array<u32, 8>, high: array<u32, 8>) -> array<vec4<f32>, 8> {
    var out: array<vec4<f32>, 8>;
    if (WTYPE == 10u) {
        let dm = q2k_scales(sb, s);
        for (var j = 0u; j < 8u; j++) {
            let dl = select(dm.xy, dm.zw, j >= 4u);
            out[j] = dl.x * u8x4((codes[j] >> (2u * (s & 3u))) & 0x03030303u) - dl.y;
        }
    } else if (WTYPE == 11u) {
        let dl = q3k_scales(sb, s);
        for (var j = 0u; j < 8u; j++) {
            let low = (codes[j] >> (2u * (s & 3u))) & 0x03030303u;
            out[j] = dl[j >> 2u] * (u8x4(low | (((high[j] >> s) & 0x01010101u) << 2u)) - 4.0);
        }
    } else if (WTYPE == 12u || WTYPE == 13u) {
        let dm = q45k_scales(sb, s);
        for (var j = 0u; j < 8u; j++) {
            var code = (codes[j] >> (4u * (s & 1u))) & 0x0f0f0f0fu;
            if (WTYPE == 13u) {
                code |= ((high[j] >> s) & 0x01010101u) << 4u;
            }
            out[j] = dm.x * u8x4(code) - dm.y;
        }
    } else {
        let dl = q6k_scales(sb, s);
        let t = s & 3u;
        for (var j = 0u; j < 8u; j++) {
            let low = (codes[j] >> (4u * (t >> 1u))) & 0x0f0f0f0fu;
            out[j] = dl[j >> 2u] * (u8x4(low | (((high[j] >> (2u * t)) & 0x03030303u) << 4u)) - 32.0);
        }
    }
    return out;
}

// Sub-block s of the K-quant super-block at byte `sb`, as 8 vec4s.
fn dequant_group_k(sb: u32, s: u32) -> array<vec4<f32>, 8> {
    var high: array<u32, 8>;
    if (K_HIGH_BITS) {
        high = words8(k_high_bits_at(sb, s));
    }
    return decode_k(sb, s, words8(k_codes_at(sb, s)), high);
}

// Groups 2c and 2c + 1 of a K-quant row, as 16 vec4s: the two sub-blocks share their high-bit
// words and (except Q6_K) their code words, which are loaded once for both. Callers that walk
// a row in order use this to halve the loads of `dequant_group`.
fn dequant_group_pair(row: u32, c: u32) -> array<vec4<f32>, 16> {
    let sb = row + (c >> 2u) * BLOCK_BYTES;
    let s = 2u * (c & 3u);
    var high: array<u32, 8>;
    if (K_HIGH_BITS) {
        high = words8(k_high_bits_at(sb, s));
    }
    let codes = words8(k_codes_at(sb, s));
    var codes_next = codes;
    if (WTYPE == 14u) {
        codes_next = words8(k_codes_at(sb, s + 1u));
    }
    let first = decode_k(sb, s, codes, high);
    let second = decode_k(sb, s + 1u, codes_next, high);
    var out: array<vec4<f32>, 16>;
    for (var j = 0u; j < 8u; j++) {
        out[j] = first[j];
        out[j + 8u] = second[j];
    }
    return out;
}

// The 32 elements of group b of the row that starts at byte `row`, as 8 vec4s (elements
// 4j .. 4j+3 in slot j), with as few word loads as the layout allows: a Q4_1 block is 5 words;
// Q4_0, IQ4_NL and Q8_0 blocks, which may start at a 2-byte offset, are read as 5 and 9 whole
// words and shifted; Q5_0 and Q5_1 blocks as 6. Invocations that each own a row pay one load per
// word, so this matters more than arithmetic on devices that run invocations as SIMD lanes.
// K-quants reload, for each group, the code words it shares with sibling groups; walking a row
// in order, `dequant_group_pair` loads them half as often.
fn dequant_group(row: u32, b: u32) -> array<vec4<f32>, 8> {
    if (K_QUANT) {
        return dequant_group_k(row + (b >> 3u) * BLOCK_BYTES, b & 7u);
    }
    var out: array<vec4<f32>, 8>;
    let block = row + b * BLOCK_BYTES;
    let base = block >> 2u;
    let odd = (block & 2u) != 0u;
    if (WTYPE == 3u) {
        let dm = unpack2x16float(wload(base));
        for (var j = 0u; j < 4u; j++) {
            let q = wload(base + 1u + j);
            out[j] = dm.x * u4x4(q) + dm.y;
            out[j + 4u] = dm.x * u4x4(q >> 4u) + dm.y;
        }
        return out;
    }
    if (WTYPE == 2u || WTYPE == 20u) {
        let w0 = wload(base);
        let d = unpack2x16float(select(w0, w0 >> 16u, odd)).x;
        var lo = w0;
        for (var j = 0u; j < 4u; j++) {
            let hi = wload(base + 1u + j);
            let q = select((lo >> 16u) | (hi << 16u), hi, odd);
            if (WTYPE == 2u) {
                out[j] = d * (u4x4(q) - 8.0);
                out[j + 4u] = d * (u4x4(q >> 4u) - 8.0);
            } else {
                out[j] = d * iq4x4(q);
                out[j + 4u] = d * iq4x4(q >> 4u);
            }
            lo = hi;
        }
        return out;
    }
    if (WTYPE == 6u) {
        // Six words cover the 22 bytes at either alignment; the fifth bits start at byte 2.
        var w: array<u32, 6>;
        for (var i = 0u; i < 6u; i++) {
            w[i] = wload(base + i);
        }
        let d = unpack2x16float(select(w[0], w[0] >> 16u, odd)).x;
        let qh = select((w[0] >> 16u) | (w[1] << 16u), w[1], odd);
        for (var j = 0u; j < 4u; j++) {
            let qs = select((w[1u + j] >> 16u) | (w[2u + j] << 16u), w[2u + j], odd);
            out[j] = d * (q5x4(qh, qs, j) - 16.0);
            out[j + 4u] = d * (q5x4(qh, qs, j + 4u) - 16.0);
        }
        return out;
    }
    if (WTYPE == 7u) {
        let dm = unpack2x16float(wload(base));
        let qh = wload(base + 1u);
        for (var j = 0u; j < 4u; j++) {
            let qs = wload(base + 2u + j);
            out[j] = dm.x * q5x4(qh, qs, j) + dm.y;
            out[j + 4u] = dm.x * q5x4(qh, qs, j + 4u) + dm.y;
        }
        return out;
    }
    if (WTYPE == 8u) {
        let w0 = wload(base);
        let d = unpack2x16float(select(w0, w0 >> 16u, odd)).x;
        var lo = w0;
        for (var j = 0u; j < 8u; j++) {
            let hi = wload(base + 1u + j);
            out[j] = d * i8x4(select((lo >> 16u) | (hi << 16u), hi, odd));
            lo = hi;
        }
        return out;
    }
    // F32 and F16 (groups of 32 elements): through the general path.
    for (var j = 0u; j < 8u; j++) {
        out[j] = dequant4(row, 8u * b + j);
    }
    return out;
}
