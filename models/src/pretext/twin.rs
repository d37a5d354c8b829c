//! Momentum encoders: a student module built twice, the second copy (the teacher, `teacher.*`)
//! starting equal to the student, getting no gradient and following it by an exponential moving
//! average (MoCo's key encoder, BYOL's target, PixPro's momentum network, DINO's teacher).

use densa_exporter::train::ema::{ema_update, EmaConfig};
use densa_exporter::train::Fragment;
use densa_exporter::{GraphBuilder, ParamKind};

use super::PretextError;

/// Scope of the momentum encoder's parameters.
pub const TEACHER: &str = "teacher";

/// Name of the EMA momentum hyper input.
pub const EMA_MOMENTUM: &str = "ema.momentum";

/// A module and its momentum twin.
pub struct Twin<T> {
    /// Built at the current scope: trained.
    pub student: T,
    /// Built under `teacher`: buffers, updated by the EMA in `ema`.
    pub teacher: T,
    /// The EMA updates `teacher.x <- m teacher.x + (1 - m) x` of every teacher parameter (its
    /// batch-norm running statistics are not averaged: they follow the teacher's own forward
    /// passes, as in MoCo), and the hyper input `ema.momentum` with default `momentum`.
    pub ema: Fragment,
}

/// Initialises the modules of `init` twice (see [`Twin`]). `init` creates parameters only; the
/// caller runs the forward passes of both copies.
pub fn momentum_twin<T>(
    b: &mut GraphBuilder,
    momentum: f64,
    mut init: impl FnMut(&mut GraphBuilder) -> Result<T, PretextError>,
) -> Result<Twin<T>, PretextError> {
    let n0 = b.params().len();
    let student = init(b)?;
    let n1 = b.params().len();
    let teacher = b.scoped(TEACHER, &mut init)?;
    let n2 = b.params().len();
    let created: Vec<_> = b.params()[n1..n2]
        .iter()
        .filter(|p| p.kind != ParamKind::Constant)
        .cloned()
        .collect();
    let student_names: std::collections::HashSet<String> =
        b.params()[n0..n1].iter().map(|p| p.name.clone()).collect();
    let prefix = format!("{TEACHER}.");
    let mut pairs = Vec::new();
    for p in created {
        let Some(name) = p.name.strip_prefix(&prefix) else {
            continue;
        };
        if !student_names.contains(name) {
            return Err(PretextError::Invalid {
                method: "momentum encoder".into(),
                problem: format!("teacher value `{}` has no student `{name}`", p.name),
            });
        }
        let value = b
            .initializer_value(name)
            .expect("the student's initializer exists")
            .clone();
        b.set_initializer(&p.name, value)?;
        if p.kind == ParamKind::Param {
            let t = b.initializer_handle(&p.name).expect("created above");
            let s = b.initializer_handle(name).expect("exists");
            pairs.push((t, s));
        }
    }
    b.set_param_kind(TEACHER, ParamKind::Buffer);
    let ema = ema_update(
        b,
        &pairs,
        &EmaConfig {
            momentum,
            prefix: "ema".into(),
        },
    )?;
    Ok(Twin {
        student,
        teacher,
        ema,
    })
}
