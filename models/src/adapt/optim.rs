//! AdamW on the host (Loshchilov & Hutter 2019, PyTorch's `torch.optim.AdamW` update with bias
//! correction), with optional clipping of the gradients' global L2 norm first
//! (`clip_grad_norm_`). The adaptation graphs output gradients; the update is a few vector
//! operations per accumulated batch, so it stays on the host.

use std::collections::BTreeMap;

use ndarray::ArrayD;

/// AdamW state and hyperparameters.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// `beta1`, `beta2` (PyTorch: 0.9, 0.999).
    pub betas: (f32, f32),
    /// Added to the denominator (PyTorch: 1e-8).
    pub eps: f32,
    /// Decoupled weight decay (PyTorch: 0.01; ours for adaptation: 1e-4).
    pub weight_decay: f32,
    /// Largest global gradient norm; larger gradients are scaled down. `None`: no clipping.
    pub clip_norm: Option<f32>,
    step: u32,
    exp_avg: BTreeMap<String, ArrayD<f32>>,
    exp_avg_sq: BTreeMap<String, ArrayD<f32>>,
}

impl AdamW {
    /// AdamW with learning rate `lr`, PyTorch's betas and eps, weight decay 1e-4, clipping at
    /// global norm 10 (densa's fine-tuning recipe).
    pub fn new(lr: f32) -> AdamW {
        AdamW {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-4,
            clip_norm: Some(10.0),
            step: 0,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u32 {
        self.step
    }

    /// One update of `params` with `grads` (same names and shapes; names missing from `grads`
    /// are not updated). Returns the gradients' global norm before clipping.
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, ArrayD<f32>>,
        grads: &BTreeMap<String, ArrayD<f32>>,
    ) -> f32 {
        let norm = grads
            .values()
            .map(|g| g.iter().map(|x| x * x).sum::<f32>())
            .sum::<f32>()
            .sqrt();
        let scale = match self.clip_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (name, p) in params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let m = self
                .exp_avg
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            let v = self
                .exp_avg_sq
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            ndarray::Zip::from(&mut *p)
                .and(&mut *m)
                .and(&mut *v)
                .and(g)
                .for_each(|p, m, v, &g| {
                    let g = g * scale;
                    *p *= 1.0 - self.lr * self.weight_decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = (*v / bc2).sqrt() + self.eps;
                    *p -= self.lr * (*m / bc1) / denom;
                });
        }
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps against the AdamW formulas written out by hand (PyTorch's algorithm).
    #[test]
    fn matches_the_written_out_update() {
        let mut opt = AdamW::new(0.1);
        opt.clip_norm = None;
        opt.weight_decay = 0.01;
        let mut params = BTreeMap::from([("w".to_string(), ArrayD::from_elem(vec![1], 1.0f32))]);
        let (mut p, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25f64)] {
            let grads = BTreeMap::from([("w".to_string(), ArrayD::from_elem(vec![1], g as f32))]);
            opt.step(&mut params, &grads);
            p *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = v / (1.0 - 0.999f64.powi(t));
            p -= 0.1 * mh / (vh.sqrt() + 1e-8);
            assert!((params["w"][[0]] as f64 - p).abs() < 1e-6, "step {t}");
        }
    }

    #[test]
    fn clipping_scales_by_the_global_norm() {
        let mut opt = AdamW::new(0.0);
        opt.clip_norm = Some(1.0);
        let mut params = BTreeMap::from([("a".to_string(), ArrayD::zeros(vec![2]))]);
        let grads = BTreeMap::from([(
            "a".to_string(),
            ArrayD::from_shape_vec(vec![2], vec![3.0f32, 4.0]).unwrap(),
        )]);
        assert!((opt.step(&mut params, &grads) - 5.0).abs() < 1e-6);
    }
}
