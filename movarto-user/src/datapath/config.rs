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
        check_tunnel(
            self.mode,
            self.token,
            self.local_tunnel_addr,
            self.peer_tunnel_addr,
        )?;
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
            slot: 0,
            netns_cookie: self.netns_cookie,
        })
    }
}

/// The node-wide half of a configuration, for the uplink's entry: the tunnel
/// endpoint, GUE port, tunnel MTU, uplink, gateway MAC and namespace; no service.
pub fn uplink_part(config: &Config) -> Config {
    Config {
        mode: Mode::Idle as u8,
        service_family: 0,
        home_addr: [0; 16],
        new_addr: [0; 16],
        peer_tunnel_addr: [0; 16],
        token: 0,
        vm_ifindex: 0,
        vm_mac: [0; 6],
        slot: 0,
        ..*config
    }
}

/// A service's entry: `service`'s own fields, the node-wide ones of `uplink`.
pub fn service_on(uplink: &Config, service: &Config) -> Config {
    Config {
        mode: service.mode,
        service_family: service.service_family,
        home_addr: service.home_addr,
        new_addr: service.new_addr,
        peer_tunnel_addr: service.peer_tunnel_addr,
        token: service.token,
        vm_ifindex: service.vm_ifindex,
        vm_mac: service.vm_mac,
        slot: service.slot,
        ..uplink_part(uplink)
    }
}

/// A mode that carries GUE needs both endpoints and the migration's token: the
/// datapath accepts GUE only from the peer's endpoint with the token, and with
/// token 0 or no peer anyone who can reach the GUE port could reach the VM.
pub fn check_tunnel(
    mode: Mode,
    token: SessionToken,
    local: Ipv4Addr,
    peer: Ipv4Addr,
) -> Result<()> {
    if !mode.uses_tunnel() {
        return Ok(());
    }
    if token == SessionToken(0) {
        bail!(
            "mode {mode} carries the tunnel and needs the migration's session token,              the same at both sites; token 0 would accept unauthenticated GUE"
        );
    }
    if peer.is_unspecified() {
        bail!("mode {mode} carries the tunnel and needs the peer site's tunnel endpoint");
    }
    if local.is_unspecified() {
        bail!("mode {mode} carries the tunnel and needs this site's tunnel endpoint");
    }
    if local == peer {
        bail!("this site's tunnel endpoint and the peer's are both {local}");
    }
    Ok(())
}

/// [`check_tunnel`] for a configuration as the map holds it.
pub fn check_map_tunnel(mode: Mode, config: &Config) -> Result<()> {
    let v4 = |a: [u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
    check_tunnel(
        mode,
        SessionToken(config.token),
        v4(config.local_tunnel_addr),
        v4(config.peer_tunnel_addr),
    )
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

    #[test]
    fn tunnel_modes_need_a_token_and_both_endpoints() {
        let local = Ipv4Addr::new(203, 0, 113, 1);
        let peer = Ipv4Addr::new(203, 0, 113, 2);
        let home = "192.0.2.10".parse().expect("addr");
        for mode in [Mode::Forward, Mode::Receive, Mode::Direct, Mode::Return] {
            let with = |l, p, t| {
                SiteConfig::new(mode, home)
                    .with_tunnel(l, p, SessionToken(t))
                    .checked()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            assert_eq!(with(local, peer, 7), Ok(()));
            let err = with(local, peer, 0).expect_err("token 0");
            assert!(err.contains("session token"), "{err}");
            let err = with(local, Ipv4Addr::UNSPECIFIED, 7).expect_err("no peer");
            assert!(err.contains("peer site's tunnel endpoint"), "{err}");
            let err = with(Ipv4Addr::UNSPECIFIED, peer, 7).expect_err("no local");
            assert!(err.contains("this site's tunnel endpoint"), "{err}");
            assert!(with(peer, peer, 7).is_err());
        }
        for mode in [Mode::Idle, Mode::Track, Mode::Nat] {
            assert!(SiteConfig::new(mode, home).checked().is_ok(), "{mode}");
        }
    }
}
