//! movarto's manager. Split by concern; this foundation has the datapath loader.
pub mod datapath;
pub mod dns;
pub mod qemu;
