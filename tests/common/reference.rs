//! A plain f64 forward pass of the llama graph on the CPU, written from the graph alone (GGUF
//! weights dequantised by the CPU reference decoder): the independent reference the device's
//! logits are held to.

use tessera::models::llm::LlamaConfig;
use tessera::runtime::dequantize_row;
use tessera::runtime::io::gguf::GgufFile;
use tessera::runtime::DType;

/// A weight `[rows, cols]` dequantised to f64, row-major.
fn matrix(file: &GgufFile, name: &str) -> (Vec<f64>, usize, usize) {
    let info = file
        .tensor(name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    let dims = info.dims();
    let (cols, rows) = (dims[0] as usize, dims.get(1).copied().unwrap_or(1) as usize);
    let dtype = DType::from_ggml_id(info.ggml_type().id()).expect("a runtime type");
    let row_bytes = dtype.row_bytes(cols).unwrap();
    let data = file.tensor_data(info);
    let mut out = vec![0.0f64; rows * cols];
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        dequantize_row(dtype, &data[r * row_bytes..(r + 1) * row_bytes], &mut row);
        for (o, &v) in out[r * cols..(r + 1) * cols].iter_mut().zip(&row) {
            *o = v as f64;
        }
    }
    (out, rows, cols)
}

/// y = W x for one vector.
fn matvec(w: &(Vec<f64>, usize, usize), x: &[f64]) -> Vec<f64> {
    let (data, rows, cols) = w;
    (0..*rows)
        .map(|r| {
            data[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let scale = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * scale * g).collect()
}

/// GGML's normal RoPE (adjacent pairs) on one head vector at `pos`.
fn rope(x: &mut [f64], pos: usize, n_rot: usize, base: f64) {
    for i in 0..n_rot / 2 {
        let theta = pos as f64 * base.powf(-2.0 * i as f64 / n_rot as f64);
        let (s, c) = theta.sin_cos();
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = a * s + b * c;
    }
}

/// The logits at every position of `tokens`, evaluated from position 0.
pub fn logits(file: &GgufFile, c: &LlamaConfig, tokens: &[u32]) -> Vec<Vec<f64>> {
    let hd = c.head_dim;
    let embd = matrix(file, "token_embd.weight");
    let vector = |name: &str| matrix(file, name).0;
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embd.0[t as usize * c.n_embd..][..c.n_embd].to_vec())
        .collect();
    for l in 0..c.n_layer {
        let name = |s: &str| format!("blk.{l}.{s}.weight");
        let (wq, wk, wv, wo) = (
            matrix(file, &name("attn_q")),
            matrix(file, &name("attn_k")),
            matrix(file, &name("attn_v")),
            matrix(file, &name("attn_output")),
        );
        let (attn_norm, ffn_norm) = (vector(&name("attn_norm")), vector(&name("ffn_norm")));
        let (gate, up, down) = (
            matrix(file, &name("ffn_gate")),
            matrix(file, &name("ffn_up")),
            matrix(file, &name("ffn_down")),
        );
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (pos, x) in xs.iter_mut().enumerate() {
            let xn = rmsnorm(x, &attn_norm, c.rms_eps as f64);
            let mut q = matvec(&wq, &xn);
            let mut k = matvec(&wk, &xn);
            for h in 0..c.n_head {
                rope(
                    &mut q[h * hd..(h + 1) * hd],
                    pos,
                    c.n_rot,
                    c.rope_base as f64,
                );
            }
            for h in 0..c.n_head_kv {
                rope(
                    &mut k[h * hd..(h + 1) * hd],
                    pos,
                    c.n_rot,
                    c.rope_base as f64,
                );
            }
            keys.push(k);
            values.push(matvec(&wv, &xn));
            let mut attn = vec![0.0; c.n_head * hd];
            for h in 0..c.n_head {
                let kvh = h / (c.n_head / c.n_head_kv);
                let qh = &q[h * hd..(h + 1) * hd];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kvh * hd..])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                for d in 0..hd {
                    attn[h * hd + d] = w
                        .iter()
                        .zip(&values)
                        .map(|(p, v)| p * v[kvh * hd + d])
                        .sum::<f64>()
                        / sum;
                }
            }
            for (xi, oi) in x.iter_mut().zip(matvec(&wo, &attn)) {
                *xi += oi;
            }
            let xn = rmsnorm(x, &ffn_norm, c.rms_eps as f64);
            let g = matvec(&gate, &xn);
            let u = matvec(&up, &xn);
            let h: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (xi, di) in x.iter_mut().zip(matvec(&down, &h)) {
                *xi += di;
            }
        }
    }
    let norm = vector("output_norm.weight");
    let output = if file.tensor("output.weight").is_some() {
        matrix(file, "output.weight")
    } else {
        embd
    };
    xs.iter()
        .map(|x| matvec(&output, &rmsnorm(x, &norm, c.rms_eps as f64)))
        .collect()
}
