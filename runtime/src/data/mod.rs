//! Datasets: readers for the formats densa trains and evaluates on.

pub mod coco;
