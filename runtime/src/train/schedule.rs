//! Host-side hyperparameter schedules: step -> values of the artifact's `hyper` inputs.
//!
//! A schedule is a pure function of the step (steps completed before the one about to run),
//! so a resumed run needs nothing but the step to continue it. Inputs a schedule leaves out
//! take the manifest's `default`. Closures `Fn(u64) -> Vec<(String, f64)>` are schedules.

/// Values of hyper inputs at a step.
pub trait Schedule {
    /// The values for the step about to run; `step` counts the steps completed before it.
    fn values(&self, step: u64) -> Vec<(String, f64)>;
    /// A short description recorded in checkpoints.
    fn describe(&self) -> String {
        String::from("schedule")
    }
}

impl<F: Fn(u64) -> Vec<(String, f64)>> Schedule for F {
    fn values(&self, step: u64) -> Vec<(String, f64)> {
        self(step)
    }
    fn describe(&self) -> String {
        String::from("closure")
    }
}

/// No schedule: every hyper input takes its manifest default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Defaults;

impl Schedule for Defaults {
    fn values(&self, _: u64) -> Vec<(String, f64)> {
        Vec::new()
    }
    fn describe(&self) -> String {
        String::from("defaults")
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then half-cosine decay to `floor` at
/// `total` steps (Loshchilov & Hutter's SGDR without restarts, Goyal et al.'s warm-up), held
/// at `floor` after. The schedule most self-supervised methods use for the learning rate.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupCosine {
    /// The hyper input it drives (usually `lr`).
    pub input: String,
    /// Value at the end of warm-up.
    pub peak: f64,
    /// Final value.
    pub floor: f64,
    /// Warm-up steps (0: none).
    pub warmup: u64,
    /// Step at which the decay reaches `floor`.
    pub total: u64,
}

impl WarmupCosine {
    /// The value at `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.floor + 0.5 * (self.peak - self.floor) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

impl Schedule for WarmupCosine {
    fn values(&self, step: u64) -> Vec<(String, f64)> {
        vec![(self.input.clone(), self.at(step))]
    }
    fn describe(&self) -> String {
        format!(
            "warmup-cosine {} peak={} floor={} warmup={} total={}",
            self.input, self.peak, self.floor, self.warmup, self.total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_ramps_then_decays_to_the_floor() {
        let s = WarmupCosine {
            input: "lr".into(),
            peak: 1.0,
            floor: 0.1,
            warmup: 4,
            total: 14,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert_eq!(s.at(4), 1.0);
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(100) - 0.1).abs() < 1e-12);
        assert_eq!(s.values(0), vec![("lr".to_string(), 0.25)]);
    }

    #[test]
    fn closures_are_schedules() {
        let s = |step: u64| vec![("lr".to_string(), 1.0 / (step + 1) as f64)];
        assert_eq!(Schedule::values(&s, 1), vec![("lr".to_string(), 0.5)]);
    }
}
