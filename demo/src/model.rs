//! The demo's model: a 64-32-10 perceptron (tanh, softmax cross-entropy)
//! on the 8x8 handwritten digits, with parameters in one flat vector so a
//! gradient is one all-reduce.

use phalanx_protocol::rng::SplitMix64;

/// Inputs (8x8 pixels).
pub const INPUTS: usize = 64;
/// Hidden units.
pub const HIDDEN: usize = 32;
/// Classes.
pub const CLASSES: usize = 10;
/// Parameters: W1, b1, W2, b2.
pub const PARAMS: usize = INPUTS * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES;

/// One sample: normalised pixels and the label.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Pixels / 16.
    pub x: [f32; INPUTS],
    /// The digit.
    pub label: usize,
}

/// The shipped data set (see `demo/data/README.md`).
pub fn digits() -> Vec<Sample> {
    const RAW: &[u8] = include_bytes!("../data/digits.bin");
    RAW.chunks_exact(INPUTS + 1)
        .map(|r| {
            let mut x = [0.0f32; INPUTS];
            for (d, &p) in x.iter_mut().zip(&r[..INPUTS]) {
                *d = f32::from(p) / 16.0;
            }
            Sample {
                x,
                label: usize::from(r[INPUTS]),
            }
        })
        .collect()
}

/// Shuffles with `seed` and splits off `test` samples.
pub fn split(mut all: Vec<Sample>, test: usize, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..all.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        all.swap(i, j);
    }
    let train = all.split_off(test);
    (train, all)
}

/// Initial parameters (small uniform weights, zero biases).
pub fn init(seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ 0x1417);
    let mut p = vec![0.0f32; PARAMS];
    let mut uniform =
        |scale: f32| (rng.below(1 << 24) as f32 / (1 << 24) as f32 * 2.0 - 1.0) * scale;
    let (w1, rest) = p.split_at_mut(INPUTS * HIDDEN);
    w1.iter_mut().for_each(|w| *w = uniform(0.3));
    let (_, rest) = rest.split_at_mut(HIDDEN);
    let (w2, _) = rest.split_at_mut(HIDDEN * CLASSES);
    w2.iter_mut().for_each(|w| *w = uniform(0.3));
    p
}

struct View<'a> {
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
}

fn view(p: &[f32]) -> View<'_> {
    let (w1, rest) = p.split_at(INPUTS * HIDDEN);
    let (b1, rest) = rest.split_at(HIDDEN);
    let (w2, b2) = rest.split_at(HIDDEN * CLASSES);
    View { w1, b1, w2, b2 }
}

fn forward(v: &View<'_>, x: &[f32; INPUTS]) -> ([f32; HIDDEN], [f32; CLASSES]) {
    let mut h = [0.0f32; HIDDEN];
    for (j, hj) in h.iter_mut().enumerate() {
        let mut a = v.b1[j];
        for (i, xi) in x.iter().enumerate() {
            a += v.w1[i * HIDDEN + j] * xi;
        }
        *hj = a.tanh();
    }
    let mut z = [0.0f32; CLASSES];
    for (k, zk) in z.iter_mut().enumerate() {
        let mut a = v.b2[k];
        for (j, hj) in h.iter().enumerate() {
            a += v.w2[j * CLASSES + k] * hj;
        }
        *zk = a;
    }
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|a| (a - max).exp()).sum();
    for zk in z.iter_mut() {
        *zk = (*zk - max).exp() / sum;
    }
    (h, z)
}

/// The mean loss over `batch` and its gradient (into `grad`).
pub fn gradient(p: &[f32], batch: &[&Sample], grad: &mut [f32]) -> f32 {
    grad.iter_mut().for_each(|g| *g = 0.0);
    let v = view(p);
    let (gw1, rest) = grad.split_at_mut(INPUTS * HIDDEN);
    let (gb1, rest) = rest.split_at_mut(HIDDEN);
    let (gw2, gb2) = rest.split_at_mut(HIDDEN * CLASSES);
    let scale = 1.0 / batch.len() as f32;
    let mut loss = 0.0;
    for s in batch {
        let (h, probs) = forward(&v, &s.x);
        loss -= probs[s.label].max(1e-12).ln();
        let mut dz = probs;
        dz[s.label] -= 1.0;
        let mut dh = [0.0f32; HIDDEN];
        for (j, hj) in h.iter().enumerate() {
            for (k, dzk) in dz.iter().enumerate() {
                gw2[j * CLASSES + k] += hj * dzk * scale;
                dh[j] += v.w2[j * CLASSES + k] * dzk;
            }
        }
        for (k, dzk) in dz.iter().enumerate() {
            gb2[k] += dzk * scale;
        }
        for j in 0..HIDDEN {
            let da = dh[j] * (1.0 - h[j] * h[j]) * scale;
            gb1[j] += da;
            for (i, xi) in s.x.iter().enumerate() {
                gw1[i * HIDDEN + j] += xi * da;
            }
        }
    }
    loss * scale
}

/// Accuracy on `samples`, in percent.
pub fn accuracy(p: &[f32], samples: &[Sample]) -> f64 {
    let v = view(p);
    let right = samples
        .iter()
        .filter(|s| {
            let (_, probs) = forward(&v, &s.x);
            let best = (0..CLASSES)
                .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
                .expect("classes");
            best == s.label
        })
        .count();
    100.0 * right as f64 / samples.len() as f64
}

/// Member `m`'s (of `n`) minibatch for `step`: the step's global batch is
/// the next `n * batch` samples of the (shuffled) training set, round and
/// round, and member `m` takes its `m`-th slice. A member left out of a
/// step skips those samples only; every member sees the whole data set.
pub fn batch_of(train: &[Sample], n: usize, m: usize, step: u64, batch: usize) -> Vec<&Sample> {
    let start = (step as usize * n + m) * batch;
    (0..batch)
        .map(|k| &train[(start + k) % train.len()])
        .collect()
}

/// The learning rate of `step` of `steps`: constant, then a linear decay to
/// a tenth over the last 40% (the end of a run converges, so runs that lost
/// different steps end close together).
pub fn learning_rate(base: f32, step: u64, steps: u64) -> f32 {
    let from = steps * 3 / 5;
    if step < from {
        return base;
    }
    let t = (step - from) as f32 / (steps - from).max(1) as f32;
    base * (1.0 - 0.9 * t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_set_is_all_there() {
        let d = digits();
        assert_eq!(d.len(), 1797);
        for c in 0..CLASSES {
            assert!(d.iter().filter(|s| s.label == c).count() > 170);
        }
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let (train, _) = split(digits(), 100, 1);
        let p = init(1);
        let batch: Vec<&Sample> = train.iter().take(8).collect();
        let mut g = vec![0.0; PARAMS];
        gradient(&p, &batch, &mut g);
        let mut scratch = vec![0.0; PARAMS];
        for &i in &[0, 100, INPUTS * HIDDEN + 3, PARAMS - 15, PARAMS - 1] {
            let eps = 1e-2;
            let mut q = p.clone();
            q[i] += eps;
            let up = gradient(&q, &batch, &mut scratch);
            q[i] -= 2.0 * eps;
            let down = gradient(&q, &batch, &mut scratch);
            let fd = (up - down) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 2e-3 + 0.05 * fd.abs(),
                "param {i}: analytic {} numeric {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn training_learns_the_digits() {
        let (train, test) = split(digits(), 297, 7);
        let mut p = init(7);
        let mut g = vec![0.0; PARAMS];
        for step in 0..300 {
            let b = batch_of(&train, 1, 0, step, 32);
            gradient(&p, &b, &mut g);
            p.iter_mut().zip(&g).for_each(|(w, g)| *w -= 0.5 * g);
        }
        assert!(accuracy(&p, &test) > 85.0, "{}", accuracy(&p, &test));
    }
}
