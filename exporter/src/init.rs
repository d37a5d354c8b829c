//! Parameter initialisation schemes, as PyTorch defines them.

use ndarray::{ArrayD, IxDyn};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Normal, Uniform};

use crate::builder::Init;

/// `(fan_in, fan_out)` of a weight of this shape, PyTorch's `_calculate_fan_in_and_fan_out`.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    match shape.len() {
        0 => (1, 1),
        1 => (shape[0], shape[0]),
        _ => {
            let receptive: usize = shape[2..].iter().product();
            (shape[1] * receptive, shape[0] * receptive)
        }
    }
}

/// Values of a tensor of `shape` drawn by `init`.
pub fn initialise(init: Init, shape: &[usize], rng: &mut ChaCha8Rng) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let (fan_in, fan_out) = fans(shape);
    let normal = |std: f32, rng: &mut ChaCha8Rng| -> Vec<f32> {
        let d = Normal::new(0.0f32, std.max(0.0)).expect("finite std");
        (0..n).map(|_| rng.sample(d)).collect()
    };
    let uniform = |bound: f32, rng: &mut ChaCha8Rng| -> Vec<f32> {
        if bound <= 0.0 {
            return vec![0.0; n];
        }
        let d = Uniform::new(-bound, bound).expect("bound > 0");
        (0..n).map(|_| rng.sample(d)).collect()
    };
    let data = match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Constant(c) => vec![c; n],
        Init::KaimingNormalFanOut => normal((2.0 / fan_out.max(1) as f32).sqrt(), rng),
        Init::KaimingUniformFanIn => uniform(1.0 / (fan_in.max(1) as f32).sqrt(), rng),
        Init::Normal(std) => normal(std, rng),
        Init::Uniform(bound) => uniform(bound, rng),
    };
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("n elements")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn kaiming_fan_out_has_the_right_spread() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let w = initialise(Init::KaimingNormalFanOut, &[64, 32, 3, 3], &mut rng);
        let var = w.mapv(|v| v * v).mean().unwrap();
        let expected = 2.0 / (64.0 * 9.0);
        assert!(
            (var - expected).abs() / expected < 0.05,
            "var {var} vs {expected}"
        );
    }

    #[test]
    fn same_seed_same_values() {
        let a = initialise(Init::Uniform(1.0), &[10], &mut ChaCha8Rng::seed_from_u64(3));
        let b = initialise(Init::Uniform(1.0), &[10], &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(a, b);
    }
}
