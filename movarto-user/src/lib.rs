//! movarto's manager. Split by concern; this foundation has the datapath loader.
pub mod agent;
pub mod bench;
pub mod datapath;
pub mod dns;
pub mod inventory;
pub mod jobs;
pub mod migrate;
pub mod qemu;
pub mod units;
