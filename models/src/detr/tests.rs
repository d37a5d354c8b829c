//! Tests of the DETR graph pieces against direct host computations.
