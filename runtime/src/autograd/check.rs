//! Gradient checks: central finite differences of an f64 CPU reference.

/// The gradient of `f` at `x` by central differences, with a step scaled to each value.
pub fn finite_diff(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = x[i];
            let h = 1e-5 * v.abs().max(1.0);
            x[i] = v + h;
            let up = f(&x);
            x[i] = v - h;
            let down = f(&x);
            x[i] = v;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `sum(probe * out)`: the scalar whose gradient a backward pass seeded with `probe` computes.
pub fn probe_loss(out: &[f64], probe: &[f32]) -> f64 {
    assert_eq!(out.len(), probe.len());
    out.iter().zip(probe).map(|(o, &p)| o * p as f64).sum()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Fails unless `got` (from the device) matches `want` within `tol`, relative to the larger of
/// 1 and `want`'s largest magnitude.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| ((g as f64 - w).abs() / scale, i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        worst <= tol,
        "{what}: relative error {worst:.3e} at {at} (device {}, reference {}), tolerance {tol:.0e}",
        got[at],
        want[at]
    );
}
