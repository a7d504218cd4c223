//! Types shared by the eBPF datapath (`no_std`) and userspace (feature `user`).
//!
//! Every type here is `#[repr(C)]` and defined once; the eBPF programs and the
//! manager both compile against it, so the map layouts cannot drift apart.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod checksum;
pub mod config;
pub mod counters;
pub mod flow;
pub mod gue;
pub mod ids;
pub mod monitor;
pub mod net;
pub mod recorder;
pub mod service;
pub mod ttl;
