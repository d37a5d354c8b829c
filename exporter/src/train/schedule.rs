//! Host-side schedules of scalar hyperparameters (learning rate, EMA momentum, weight decay):
//! pure functions of the step, fed to the step graph's hyperparameter inputs.
//!
//! A [`Schedule`] is a base value, a [`Decay`] and an optional linear [`Warmup`]:
//!
//! - warmup (Goyal et al. 2017, as SimCLR, BYOL, MoCo v3 use it): for `step < W` the value is
//!   `decay(step) * (f + (1 - f) * step / W)` with `f` the start factor (PyTorch's `LinearLR`
//!   convention; `f = 0` starts from zero as SimCLR and MoCo v3 do);
//! - cosine (Loshchilov & Hutter 2017, without restarts; SimCLR, BYOL, MoCo v3, DINO): with
//!   `p = clamp((step - W) / (T - W), 0, 1)` the progress after warmup,
//!   `final + (base - final) * (1 + cos(pi * p)) / 2`. The decay starts where warmup ends (so
//!   the value is continuous there) and holds `final` after `T` steps. A `final` above `base`
//!   gives BYOL's and DINO's increasing EMA momentum `1 - (1 - base) (cos(pi k / K) + 1) / 2`;
//! - step decay (`torch.optim.lr_scheduler.StepLR`): `base * gamma^floor(step / size)`;
//! - multi-step decay (`MultiStepLR`, detectron2's fine-tuning schedules):
//!   `base * gamma^(number of milestones <= step)`; milestones count from step 0 (warmup
//!   included), as in PyTorch and detectron2.
//!
//! `step` counts optimizer updates from 0 (the value used for the first update is `at(0)`).

/// Why a schedule is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule: {field} = {value} is invalid: {expected}")]
    Field {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("schedule: cosine decay over {total_steps} steps ends before the {warmup_steps} warmup steps do")]
    CosineShorterThanWarmup { total_steps: u64, warmup_steps: u64 },
    #[error("schedule: milestones {0:?} are not strictly increasing")]
    Milestones(Vec<u64>),
}

/// A linear warmup.
#[derive(Clone, Debug, PartialEq)]
pub struct Warmup {
    /// Steps of warmup `W`; 0 means none.
    pub steps: u64,
    /// Fraction of the value at step 0; default 0.
    pub start_factor: f64,
}

impl Warmup {
    /// No warmup.
    pub fn none() -> Warmup {
        Warmup {
            steps: 0,
            start_factor: 0.0,
        }
    }

    /// `steps` of warmup from zero.
    pub fn linear(steps: u64) -> Warmup {
        Warmup {
            steps,
            start_factor: 0.0,
        }
    }
}

/// What the value does after (and during) warmup.
#[derive(Clone, Debug, PartialEq)]
pub enum Decay {
    /// Stays at the base value.
    Constant,
    /// Cosine from the base value to `final_value` between the end of warmup and `total_steps`.
    Cosine { total_steps: u64, final_value: f64 },
    /// Multiplied by `gamma` every `step_size` steps.
    Step { step_size: u64, gamma: f64 },
    /// Multiplied by `gamma` at each milestone.
    MultiStep { milestones: Vec<u64>, gamma: f64 },
}

/// A schedule: base value, decay, warmup.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub base: f64,
    pub decay: Decay,
    pub warmup: Warmup,
}

impl Schedule {
    /// A constant value.
    pub fn constant(value: f64) -> Schedule {
        Schedule {
            base: value,
            decay: Decay::Constant,
            warmup: Warmup::none(),
        }
    }

    /// Linear warmup from 0 over `warmup_steps`, then cosine to `final_value` at `total_steps`:
    /// the SSL papers' learning-rate schedule.
    pub fn warmup_cosine(
        base: f64,
        warmup_steps: u64,
        total_steps: u64,
        final_value: f64,
    ) -> Schedule {
        Schedule {
            base,
            decay: Decay::Cosine {
                total_steps,
                final_value,
            },
            warmup: Warmup::linear(warmup_steps),
        }
    }

    /// Checks the fields; [`at`](Self::at) assumes a valid schedule.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let finite = |field, value: f64| {
            if value.is_finite() {
                Ok(())
            } else {
                Err(ScheduleError::Field {
                    field,
                    value,
                    expected: "a finite number",
                })
            }
        };
        finite("base", self.base)?;
        let f = self.warmup.start_factor;
        if !(0.0..=1.0).contains(&f) {
            return Err(ScheduleError::Field {
                field: "warmup.start_factor",
                value: f,
                expected: "0 <= start_factor <= 1",
            });
        }
        match &self.decay {
            Decay::Constant => Ok(()),
            Decay::Cosine {
                total_steps,
                final_value,
            } => {
                finite("final_value", *final_value)?;
                if *total_steps <= self.warmup.steps {
                    return Err(ScheduleError::CosineShorterThanWarmup {
                        total_steps: *total_steps,
                        warmup_steps: self.warmup.steps,
                    });
                }
                Ok(())
            }
            Decay::Step { step_size, gamma } => {
                finite("gamma", *gamma)?;
                if *step_size == 0 {
                    return Err(ScheduleError::Field {
                        field: "step_size",
                        value: 0.0,
                        expected: "step_size >= 1",
                    });
                }
                Ok(())
            }
            Decay::MultiStep { milestones, gamma } => {
                finite("gamma", *gamma)?;
                if milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(ScheduleError::Milestones(milestones.clone()));
                }
                Ok(())
            }
        }
    }

    /// The value at `step` (0 for the first update).
    pub fn at(&self, step: u64) -> f64 {
        let warmup = self.warmup.steps;
        let decayed = match &self.decay {
            Decay::Constant => self.base,
            Decay::Cosine {
                total_steps,
                final_value,
            } => {
                let span = total_steps.saturating_sub(warmup).max(1) as f64;
                let progress = (step.saturating_sub(warmup) as f64 / span).min(1.0);
                final_value
                    + (self.base - final_value)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Decay::Step { step_size, gamma } => {
                self.base * gamma.powi((step / (*step_size).max(1)) as i32)
            }
            Decay::MultiStep { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| m <= step).count();
                self.base * gamma.powi(passed as i32)
            }
        };
        if step < warmup {
            let f = self.warmup.start_factor;
            decayed * (f + (1.0 - f) * step as f64 / warmup as f64)
        } else {
            decayed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn warmup_cosine_hits_its_landmarks() {
        let s = Schedule::warmup_cosine(0.4, 10, 110, 0.0);
        s.validate().unwrap();
        assert_eq!(s.at(0), 0.0);
        assert!(close(s.at(5), 0.2));
        assert!(close(s.at(10), 0.4), "warmup ends at the base value");
        assert!(
            close(s.at(60), 0.2),
            "halfway through the cosine is the midpoint"
        );
        assert!(close(
            s.at(35),
            0.2 * (1.0 + (std::f64::consts::PI / 4.0).cos())
        ));
        assert!(close(s.at(110), 0.0));
        assert!(
            close(s.at(1000), 0.0),
            "holds the final value after the end"
        );
        for k in 10..110 {
            assert!(s.at(k + 1) <= s.at(k), "decreasing after warmup at {k}");
        }
        for k in 0..10 {
            assert!(s.at(k + 1) > s.at(k), "increasing during warmup at {k}");
        }
    }

    #[test]
    fn increasing_cosine_is_byols_momentum() {
        let base = 0.996;
        let total = 1000;
        let s = Schedule {
            base,
            decay: Decay::Cosine {
                total_steps: total,
                final_value: 1.0,
            },
            warmup: Warmup::none(),
        };
        for k in [0, 1, 250, 500, 999, 1000] {
            let byol = 1.0
                - (1.0 - base) * ((std::f64::consts::PI * k as f64 / total as f64).cos() + 1.0)
                    / 2.0;
            assert!(close(s.at(k), byol), "step {k}: {} vs {byol}", s.at(k));
        }
    }

    #[test]
    fn step_and_multistep_decay_like_pytorch() {
        let step = Schedule {
            base: 0.1,
            decay: Decay::Step {
                step_size: 3,
                gamma: 0.5,
            },
            warmup: Warmup::none(),
        };
        let got: Vec<f64> = (0..7).map(|k| step.at(k)).collect();
        assert_eq!(got, [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]);
        let multi = Schedule {
            base: 1.0,
            decay: Decay::MultiStep {
                milestones: vec![2, 5],
                gamma: 0.1,
            },
            warmup: Warmup {
                steps: 2,
                start_factor: 0.5,
            },
        };
        multi.validate().unwrap();
        let got: Vec<f64> = (0..7).map(|k| multi.at(k)).collect();
        let want = [0.5, 0.75, 0.1, 0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1];
        assert!(got.iter().zip(want).all(|(g, w)| close(*g, w)), "{got:?}");
    }

    #[test]
    fn invalid_schedules_say_why() {
        let s = Schedule::warmup_cosine(0.1, 100, 50, 0.0);
        assert!(s.validate().unwrap_err().to_string().contains("50 steps"));
        let m = Schedule {
            base: 0.1,
            decay: Decay::MultiStep {
                milestones: vec![5, 5],
                gamma: 0.1,
            },
            warmup: Warmup::none(),
        };
        assert!(matches!(m.validate(), Err(ScheduleError::Milestones(_))));
        let w = Schedule {
            warmup: Warmup {
                steps: 3,
                start_factor: 2.0,
            },
            ..Schedule::constant(1.0)
        };
        assert!(w
            .validate()
            .unwrap_err()
            .to_string()
            .contains("start_factor"));
        assert!(Schedule::constant(f64::NAN).validate().is_err());
    }
}
