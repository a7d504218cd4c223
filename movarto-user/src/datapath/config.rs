//! The site configuration as users and the agent state it, and its map form.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use movarto_common::{
    config::{Config, GUE_DEFAULT_PORT, Mode},
    ids::{MacAddr, SessionToken},
    net::{addr, family},
};

/// Everything the datapath needs to know about its site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteConfig {
    pub mode: Mode,
    /// The home address `H`.
    pub home_addr: IpAddr,
    /// The new address `N` (site B in `nat` address mode).
    pub new_addr: Option<IpAddr>,
    /// This site's tunnel endpoint.
    pub local_tunnel_addr: Ipv4Addr,
    /// The other site's tunnel endpoint.
    pub peer_tunnel_addr: Ipv4Addr,
    pub token: SessionToken,
    pub gue_port: u16,
    /// Largest outer packet the path between the sites carries.
    pub tunnel_mtu: u16,
    pub uplink_ifindex: u32,
    pub vm_ifindex: u32,
    pub vm_mac: MacAddr,
    pub gateway_mac: MacAddr,
    /// The network namespace attached in (`attach` fills it in); 0 if unknown.
    pub netns_cookie: u64,
}

impl SiteConfig {
    /// A configuration in `mode` for `home_addr`, with defaults elsewhere.
    pub fn new(mode: Mode, home_addr: IpAddr) -> Self {
        Self {
            mode,
            home_addr,
            new_addr: None,
            local_tunnel_addr: Ipv4Addr::UNSPECIFIED,
            peer_tunnel_addr: Ipv4Addr::UNSPECIFIED,
            token: SessionToken(0),
            gue_port: GUE_DEFAULT_PORT,
            tunnel_mtu: 1500,
            uplink_ifindex: 0,
            vm_ifindex: 0,
            vm_mac: MacAddr::ZERO,
            gateway_mac: MacAddr::ZERO,
            netns_cookie: 0,
        }
    }

    /// With the new address `N` (site B in `nat` address mode).
    pub fn with_new_addr(mut self, new_addr: Option<IpAddr>) -> Self {
        self.new_addr = new_addr;
        self
    }

    /// With the tunnel: this site's and the peer's endpoints and the session token.
    pub fn with_tunnel(mut self, local: Ipv4Addr, peer: Ipv4Addr, token: SessionToken) -> Self {
        self.local_tunnel_addr = local;
        self.peer_tunnel_addr = peer;
        self.token = token;
        self
    }

    /// With the largest outer packet between the sites.
    pub fn with_tunnel_mtu(mut self, tunnel_mtu: u16) -> Self {
        self.tunnel_mtu = tunnel_mtu;
        self
    }

    /// With GUE's UDP port.
    pub fn with_gue_port(mut self, gue_port: u16) -> Self {
        self.gue_port = gue_port;
        self
    }

    /// With the VM's MAC and the VM-facing gateway's MAC (the same at both sites).
    pub fn with_macs(mut self, vm_mac: MacAddr, gateway_mac: MacAddr) -> Self {
        self.vm_mac = vm_mac;
        self.gateway_mac = gateway_mac;
        self
    }

    /// The configuration, once [`SiteConfig::to_map`] accepts it.
    pub fn checked(self) -> Result<Self> {
        self.to_map()?;
        Ok(self)
    }

    /// The map form; fails on inconsistent settings.
    pub fn to_map(&self) -> Result<Config> {
        let (home_addr, service_family) = addr::to_map(self.home_addr);
        let new_addr = match self.new_addr {
            None => [0; 16],
            Some(n) => {
                let (bytes, fam) = addr::to_map(n);
                if fam != service_family {
                    bail!(
                        "the new address {n} and the home address {} differ in family",
                        self.home_addr
                    );
                }
                bytes
            }
        };
        if usize::from(self.tunnel_mtu) < 576 {
            bail!(
                "tunnel MTU {} is below the IPv4 minimum of 576",
                self.tunnel_mtu
            );
        }
        let (local_tunnel_addr, _) = addr::to_map(IpAddr::V4(self.local_tunnel_addr));
        let (peer_tunnel_addr, _) = addr::to_map(IpAddr::V4(self.peer_tunnel_addr));
        Ok(Config {
            mode: self.mode as u8,
            service_family,
            tunnel_family: family::IPV4,
            _pad0: 0,
            gue_port: self.gue_port.to_be(),
            tunnel_mtu: self.tunnel_mtu,
            home_addr,
            new_addr,
            local_tunnel_addr,
            peer_tunnel_addr,
            token: self.token.0,
            uplink_ifindex: self.uplink_ifindex,
            vm_ifindex: self.vm_ifindex,
            vm_mac: self.vm_mac.0,
            gateway_mac: self.gateway_mac.0,
            _pad1: [0; 4],
            netns_cookie: self.netns_cookie,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_form_keeps_addresses_and_byte_order() {
        let mut site = SiteConfig::new(Mode::Track, "192.0.2.10".parse().expect("addr"));
        site.new_addr = Some("198.51.100.10".parse().expect("addr"));
        let map = site.to_map().expect("valid");
        assert_eq!(map.mode, Mode::Track as u8);
        assert_eq!(&map.home_addr[..4], &[192, 0, 2, 10]);
        assert_eq!(map.gue_port.to_ne_bytes(), 6080u16.to_be_bytes());
        assert_eq!(map.service_family, family::IPV4);
    }

    #[test]
    fn the_builder_sets_what_it_names_and_checks() {
        let site = SiteConfig::new(Mode::Receive, "192.0.2.10".parse().expect("addr"))
            .with_new_addr(Some("198.51.100.10".parse().expect("addr")))
            .with_tunnel(
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 0, 2),
                SessionToken(7),
            )
            .with_gue_port(7000)
            .with_tunnel_mtu(1400)
            .with_macs(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]))
            .checked()
            .expect("valid");
        assert_eq!(site.peer_tunnel_addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(site.token, SessionToken(7));
        assert_eq!((site.gue_port, site.tunnel_mtu), (7000, 1400));
        assert_eq!(site.gateway_mac, MacAddr([2, 0, 0, 0, 0, 2]));
        let tiny = SiteConfig::new(Mode::Track, "192.0.2.10".parse().expect("addr"))
            .with_tunnel_mtu(500)
            .checked();
        assert!(tiny.is_err());
    }

    #[test]
    fn mixed_families_and_tiny_mtu_are_refused() {
        let mut site = SiteConfig::new(Mode::Receive, "192.0.2.10".parse().expect("addr"));
        site.new_addr = Some("2001:db8::10".parse().expect("addr"));
        let err = site.to_map().expect_err("mixed families");
        assert!(err.to_string().contains("differ in family"), "{err}");
        let mut site = SiteConfig::new(Mode::Track, "192.0.2.10".parse().expect("addr"));
        site.tunnel_mtu = 500;
        assert!(site.to_map().is_err());
    }
}
