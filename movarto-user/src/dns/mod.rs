//! DNS: switching the service's name to the new site with RFC 2136 dynamic updates signed
//! with TSIG, against the zone's authoritative server.
//!
//! - [`key`]: TSIG keys from BIND key files or nsupdate's `-y`;
//! - [`message`]: UPDATE and query messages (hickory-proto);
//! - [`client`]: UDP with TCP fallback, signing and response verification;
//! - [`records`]: show, atomic replace, TTL lowering/restoring, verification;
//! - [`error`]: failures that name the server, zone and key;
//! - [`parse_server`], [`parse_name`]: servers and names as users write them.
//!
//! The `dns` verb (`movarto-user dns show|update`) is in the binary's `cli::dns`.

pub mod client;
pub mod error;
pub mod key;
pub mod message;
mod parse;
pub mod records;

pub use client::ZoneServer;
pub use error::{DnsError, DnsErrorKind};
pub use key::TsigKey;
pub use parse::{parse_name, parse_server};
