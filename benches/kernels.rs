//! Kernel throughput on the default device: mat-vec and matmul for each weight type, attention
//! at several context lengths, RMSNorm (SmolLM2-135M's shapes), and the training gemm in its
//! three orientations (the `1m` training model's shapes), and the cost of a dispatch itself.
//! Each iteration is one submit and wait, so small kernels include the submit overhead.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::runtime::autograd::matmul::{gemm, GemmShape, Strided};
use tessera::runtime::ops::{self, AttentionParams, LinearOut};
use tessera::runtime::testing::{random_f32, random_weight};
use tessera::runtime::{DType, Gpu, GpuOptions, Recorder};

fn gpu() -> Gpu {
    Gpu::new(&GpuOptions::default()).expect("a GPU adapter")
}

fn linear(c: &mut Criterion) {
    let gpu = gpu();
    let n = 1536;
    let mut group = c.benchmark_group("linear");
    group.sample_size(10);
    for dtype in DType::ALL {
        // K-quant rows are whole 256-element super-blocks: 768 instead of the model's 576.
        let k = if dtype.block_size() == 256 { 768 } else { 576 };
        let bytes = random_weight(dtype, n, k, 1);
        let w = gpu.upload_weight("w", dtype, n, k, &bytes).unwrap();
        for m in [1, 512] {
            let x = gpu.tensor_from(&[m, k], &random_f32(m * k, 2)).unwrap();
            let y = gpu.tensor(&[m, n]).unwrap();
            if m == 1 {
                group.throughput(Throughput::Bytes(bytes.len() as u64));
            } else {
                group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            }
            group.bench_function(format!("{}_m{m}", dtype.name()), |b| {
                b.iter(|| {
                    let mut rec = Recorder::new(&gpu);
                    ops::linear(&mut rec, &w, &x, m, &y, LinearOut::dense(n)).unwrap();
                    rec.submit().unwrap();
                    gpu.wait().unwrap();
                })
            });
        }
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for (tokens, kv_len) in [(1, 512), (1, 4096), (512, 512)] {
        let p = AttentionParams {
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            pos0: kv_len - tokens,
            tokens,
            kv_len,
            causal: true,
            scale: 0.125,
        };
        let q = gpu
            .tensor_from(&[tokens * 576], &random_f32(tokens * 576, 1))
            .unwrap();
        let kv = gpu
            .tensor_from(&[kv_len * 192], &random_f32(kv_len * 192, 2))
            .unwrap();
        let out = gpu.tensor(&[tokens * 576]).unwrap();
        group.bench_function(format!("q{tokens}_kv{kv_len}"), |b| {
            b.iter(|| {
                let mut rec = Recorder::new(&gpu);
                ops::attention(&mut rec, &q, &kv, &kv, &out, &p).unwrap();
                rec.submit().unwrap();
                gpu.wait().unwrap();
            })
        });
    }
    group.finish();
}

fn rmsnorm(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group("rmsnorm");
    for rows in [1, 512] {
        let x = gpu
            .tensor_from(&[rows * 576], &random_f32(rows * 576, 1))
            .unwrap();
        let w = gpu.tensor_from(&[576], &random_f32(576, 2)).unwrap();
        let y = gpu.tensor(&[rows * 576]).unwrap();
        group.throughput(Throughput::Bytes((rows * 576 * 8) as u64));
        group.bench_function(format!("rows{rows}"), |b| {
            b.iter(|| {
                let mut rec = Recorder::new(&gpu);
                ops::rmsnorm(&mut rec, &x, &w, &y, rows, 576, 1e-5).unwrap();
                rec.submit().unwrap();
                gpu.wait().unwrap();
            })
        });
    }
    group.finish();
}

/// The training gemm on a batch of 16 x 128 tokens through a 128 -> 384 layer: forward
/// (x W^T), the input gradient (dy W) and the weight gradient (dy^T x).
fn train_gemm(c: &mut Criterion) {
    let gpu = gpu();
    let (m, k, n) = (2048, 128, 384);
    let x = gpu.tensor_from(&[m * k], &random_f32(m * k, 1)).unwrap();
    let w = gpu.tensor_from(&[n * k], &random_f32(n * k, 2)).unwrap();
    let dy = gpu.tensor_from(&[m * n], &random_f32(m * n, 3)).unwrap();
    let out = gpu.tensor(&[m * n.max(k)]).unwrap();
    let dw = gpu.tensor(&[n * k]).unwrap();
    let mut group = c.benchmark_group("train_gemm");
    group.sample_size(10);
    group.throughput(Throughput::Elements((2 * m * n * k) as u64));
    type Case<'a> = (
        &'a str,
        GemmShape,
        Strided<'a>,
        Strided<'a>,
        &'a tessera::runtime::Tensor,
        usize,
    );
    let cases: [Case; 3] = [
        (
            "forward",
            GemmShape { m, n, k, batch: 1 },
            Strided::outer_major(&x, k),
            Strided::outer_major(&w, k),
            &out,
            n,
        ),
        (
            "input_grad",
            GemmShape {
                m,
                n: k,
                k: n,
                batch: 1,
            },
            Strided::outer_major(&dy, n),
            Strided::red_major(&w, k),
            &out,
            k,
        ),
        (
            "weight_grad",
            GemmShape {
                m: n,
                n: k,
                k: m,
                batch: 1,
            },
            Strided::red_major(&dy, n),
            Strided::red_major(&x, k),
            &dw,
            k,
        ),
    ];
    for (name, s, a, b, c_out, rs) in cases {
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let mut rec = Recorder::new(&gpu);
                gemm(&mut rec, s, 1.0, a, b, c_out, (0, rs, 0), false).unwrap();
                rec.submit().unwrap();
                gpu.wait().unwrap();
            })
        });
    }
    group.finish();
}

/// What one dispatch costs beyond its work: 100 dispatches of a 64-element add in one submit
/// (criterion's elements/s are dispatches a second). A decode step of SmolLM2-135M is 184
/// dispatches, so on a device where this is tens of microseconds (lavapipe, whose worker
/// threads are woken and joined for every dispatch) it is a floor under the time of a token.
fn launch(c: &mut Criterion) {
    let gpu = gpu();
    let mut group = c.benchmark_group("launch");
    group.sample_size(10);
    let (len, count) = (64, 100);
    let a = gpu.tensor_from(&[len], &random_f32(len, 1)).unwrap();
    let b = gpu.tensor_from(&[len], &random_f32(len, 2)).unwrap();
    group.throughput(Throughput::Elements(count as u64));
    group.bench_function(format!("add{len}_x{count}"), |bench| {
        bench.iter(|| {
            let mut rec = Recorder::new(&gpu);
            for _ in 0..count {
                ops::add(&mut rec, &a, &b, len).unwrap();
            }
            rec.submit().unwrap();
            gpu.wait().unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, linear, attention, rmsnorm, train_gemm, launch);
criterion_main!(benches);
