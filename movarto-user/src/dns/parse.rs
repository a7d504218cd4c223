//! Server addresses and names as users write them (the `dns` verb and `migrate`).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result};
use hickory_proto::rr::Name;

/// `ADDRESS` or `ADDRESS:PORT` (port 53 by default); IPv6 with or without brackets.
pub fn parse_server(text: &str) -> Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip: IpAddr = text
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .with_context(|| format!("--server {text:?}: expected ADDRESS or ADDRESS:PORT"))?;
    Ok(SocketAddr::new(ip, 53))
}

/// A domain name, made fully qualified.
pub fn parse_name(text: &str) -> Result<Name> {
    let mut name =
        Name::from_ascii(text).map_err(|err| anyhow::anyhow!("invalid name {text:?}: {err}"))?;
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_take_an_optional_port() {
        assert_eq!(
            parse_server("192.0.2.53:5353").expect("v4"),
            "192.0.2.53:5353".parse().expect("a")
        );
        assert_eq!(
            parse_server("2001:db8::53").expect("v6"),
            "[2001:db8::53]:53".parse().expect("a")
        );
        assert!(parse_server("ns.example.test").is_err());
    }
}
