//! Every pretext method by name: what `densa methods` lists and `densa pretrain --method`
//! accepts.

use super::settings::{Hyper, Settings};
use super::{
    ccop, densecl, densesiam, detco, lcloss, mocov2, pixpro, regioncl, scfs, swav, Family,
    MethodInfo, Pretext, PretextError,
};

/// The methods, baseline first.
pub fn methods() -> Vec<&'static MethodInfo> {
    vec![
        &mocov2::INFO,
        &densecl::INFO,
        &pixpro::INFO,
        &densesiam::INFO,
        &lcloss::INFO,
        &swav::INFO,
        &detco::INFO,
        &regioncl::INFO,
        &scfs::INFO,
        &ccop::INFO,
        &crate::detr::detreg::INFO,
        &crate::detr::pair::pretrain::INFO,
        &crate::detr::updetr::INFO,
    ]
}

/// The method called `name`.
pub fn method_info(name: &str) -> Result<&'static MethodInfo, PretextError> {
    methods()
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| PretextError::UnknownMethod {
            name: name.to_string(),
            available: methods()
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Every hyperparameter of a method with its default (its own and the common ones).
pub fn hyperparameters(info: &MethodInfo) -> Vec<Hyper> {
    (info.hyper)()
}

/// The method `name` with its defaults overridden by `overrides` (`key`, text).
pub fn create(
    name: &str,
    overrides: &[(String, String)],
) -> Result<Box<dyn Pretext>, PretextError> {
    let info = method_info(name)?;
    let settings = Settings::resolve(info.name, &hyperparameters(info), overrides)?;
    (info.create)(settings)
}

/// The detector-pretraining method `name` (a [`Family::Detector`] entry) with its defaults
/// overridden by `overrides`.
pub fn create_detector(
    name: &str,
    overrides: &[(String, String)],
) -> Result<Box<dyn crate::detr::pretext::DetrPretext>, PretextError> {
    let info = method_info(name)?;
    let settings = Settings::resolve(info.name, &hyperparameters(info), overrides)?;
    match info.family {
        Family::Detector(create) => create(settings),
        Family::Backbone => Err(PretextError::Invalid {
            method: info.name.to_string(),
            problem: "pretrains a backbone, not a detector (its Pretext runs in `densa pretrain`)"
                .into(),
        }),
    }
}
