//! The VM's tap device at a site, with the anycast gateway (the same MAC and IP at both
//! sites) on it. Created persistent, so QEMU can open it by name and it outlives QEMU.

use std::{net::IpAddr, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use rtnetlink::{
    LinkUnspec,
    packet_route::address::{AddressAttribute, AddressFlags},
};

use super::netlink;
use crate::datapath::ifindex;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

// <linux/if_tun.h>: both are _IOW('T', n, int); TUNSETIFF also writes the name back.
nix::ioctl_readwrite_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tun_set_persist,
    nix::request_code_write!(b'T', 203, size_of::<libc::c_int>())
);

/// Parses `192.0.2.1/24` (the address keeps its host bits: it is the gateway's own).
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8)> {
    let net: IpNet = cidr
        .parse()
        .with_context(|| format!("{cidr:?} is not address/prefix"))?;
    Ok((net.addr(), net.prefix_len()))
}

/// Creates `name` if missing, then sets its MAC, adds the gateway address and brings it up.
/// Running it again changes nothing.
pub async fn ensure_tap(name: &str, mac: [u8; 6], gateway: IpAddr, prefix: u8) -> Result<()> {
    if ifindex(name).is_err() {
        create_persistent_tap(name)?;
    }
    let index = ifindex(name)?;
    netlink::session(|handle| async move {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.to_vec())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("setting {name}'s MAC and bringing it up"))?;
        let mut add = handle.address().add(index, gateway, prefix).replace();
        // No DAD for an IPv6 gateway: the same address is on the other site's
        // tap by design, and a tentative one would not answer the VM's
        // neighbour solicitations in the seconds after the move.
        if gateway.is_ipv6() {
            add.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        add.execute()
            .await
            .with_context(|| format!("adding {gateway}/{prefix} to {name}"))
    })
    .await
}

/// Deletes the tap; fine if it is already gone.
pub async fn delete_tap(name: &str) -> Result<()> {
    let Ok(index) = ifindex(name) else {
        return Ok(());
    };
    netlink::session(|handle| async move {
        handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("deleting {name}"))
    })
    .await
}

fn create_persistent_tap(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("{name:?} is not an interface name");
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: an open tun descriptor and an ifreq that lives through the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &mut request) }
        .with_context(|| format!("creating tap {name}"))?;
    // SAFETY: an open tun descriptor; TUNSETPERSIST takes an integer.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }
        .with_context(|| format!("making tap {name} persistent"))?;
    tracing::info!(tap = name, "created tap");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_cidr("192.0.2.1/24").expect("valid"),
            ("192.0.2.1".parse().expect("ip"), 24)
        );
        for bad in ["192.0.2.1", "192.0.2.1/33", "x/24", "192.0.2.1/x"] {
            let err = parse_cidr(bad).expect_err(bad).to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
