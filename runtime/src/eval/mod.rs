//! Evaluation metrics, equal to the reference tools'.
//!
//! - [`coco`]: COCO box and mask AP/AR, pycocotools' `COCOeval` number for number.
//! - [`voc`]: Pascal VOC AP at IoU 0.5, the VOC2007 11-point and the all-points (area) forms.
//! - [`seg`]: semantic segmentation: confusion matrix, per-class IoU, mIoU, pixel accuracy.
//! - [`plot`]: precision-recall curves and per-class AP bar charts as PNG files.

pub mod coco;
pub mod plot;
pub mod seg;
pub mod voc;

pub use coco::{evaluate, CocoEvaluation, CocoParams, CocoStats, EvalError, IouType};
