//! End-to-end tests: they run the real `brickbox` binary on real files and a real box.

mod campaign;
mod common;
mod copybox;
mod dedup;
mod errors;
mod incremental;
mod interrupt;
mod mount;
mod options;
mod remote;
mod roundtrip;
mod trust;
