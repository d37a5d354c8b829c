//! densa's integration tests, built as one test binary: one link instead of one per file keeps the
//! debug build small and quick to link. Each file of `tests/` is a module here; run one with
//! `cargo test --test integration <file>::`. `tests/distributed.rs` stays its own binary: it runs
//! under `mpirun` with the `mpi` feature.

mod common;
mod gradcheck;

mod adapt;
mod augment_parity;
mod autodiff_api;
mod autodiff_conv;
mod autodiff_elementwise;
mod autodiff_peer;
mod autodiff_pool;
mod autodiff_resnet;
mod autodiff_tensor;
mod backbone_export;
mod cli_errors;
mod coco_eval_parity;
mod detect_nms_export;
mod detect_serving;
mod detector_graph;
mod detector_pipeline;
mod detr;
mod device;
mod eval_seg;
mod finetune_init;
mod norm_parity;
mod onnx_io;
mod optim_parity;
mod pretrain;
mod pretrain_ccop;
mod pretrain_detr;
mod pretrain_pairdetr;
mod pretrain_updetr;
mod proposals;
mod reader_fuzz_smoke;
mod segmenter_loss;
mod segmenter_pipeline;
mod torchvision_parity;
mod train_classify;
mod train_resume;
mod train_step_parity;
mod trainer_learning;
