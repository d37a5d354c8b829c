//! The DETR training step driver.
