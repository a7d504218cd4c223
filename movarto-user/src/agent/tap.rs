//! The VM's tap device at a site, with the anycast gateway (the same MAC and IP at both
//! sites) on it. Created persistent, so QEMU can open it by name and it outlives QEMU.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};
use rtnetlink::LinkUnspec;

use crate::datapath::ifindex;

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Parses `192.0.2.1/24`.
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("{cidr:?} is not address/prefix"))?;
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("{cidr:?}: bad address"))?;
    let prefix: u8 = prefix
        .parse()
        .with_context(|| format!("{cidr:?}: bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        bail!("{cidr:?}: prefix longer than {max}");
    }
    Ok((ip, prefix))
}

/// Creates `name` if missing, then sets its MAC, adds the gateway address and brings it up.
/// Running it again changes nothing.
pub async fn ensure_tap(name: &str, mac: [u8; 6], gateway: IpAddr, prefix: u8) -> Result<()> {
    if ifindex(name).is_err() {
        create_persistent_tap(name)?;
    }
    let index = ifindex(name)?;
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(connection);
    let result = async {
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
        handle
            .address()
            .add(index, gateway, prefix)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding {gateway}/{prefix} to {name}"))
    }
    .await;
    task.abort();
    result
}

/// Deletes the tap; fine if it is already gone.
pub async fn delete_tap(name: &str) -> Result<()> {
    let Ok(index) = ifindex(name) else {
        return Ok(());
    };
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(connection);
    let result = handle
        .link()
        .del(index)
        .execute()
        .await
        .with_context(|| format!("deleting {name}"));
    task.abort();
    result
}

fn create_persistent_tap(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("{name:?} is not an interface name");
    }
    // SAFETY: a valid path and flags.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: a descriptor we just opened and own.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF takes a pointer to an ifreq that lives through the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating tap {name}"));
    }
    // SAFETY: TUNSETPERSIST takes an integer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("making tap {name} persistent"));
    }
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
