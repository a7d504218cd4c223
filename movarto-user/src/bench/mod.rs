//! Benchmarks a user runs on their own node (`movarto-user bench`).

pub mod datapath;
mod frames;
mod scratch;
