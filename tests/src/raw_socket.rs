//! Raw AF_PACKET sockets for the tests that send or capture whole frames.

use std::{
    io,
    mem::zeroed,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// The index of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> i32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index as i32
}

/// The address of `ifindex` for `protocol` (host order).
pub fn sockaddr_ll(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex;
    addr
}

/// An AF_PACKET socket bound to `iface` of the calling thread's namespace;
/// `protocol` ETH_P_ALL to capture, 0 to only send.
pub fn packet_socket(iface: &str, protocol: u16) -> OwnedFd {
    // SAFETY: plain syscall; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    };
    assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = sockaddr_ll(ifindex(iface), protocol);
    // SAFETY: a valid sockaddr_ll and its size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "bind to {iface}: {}", io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid timeval and its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
    fd
}

/// Sends `frame` out of interface `iface_index` on `fd`.
pub fn send_frame(fd: &OwnedFd, iface_index: i32, frame: &[u8]) {
    let mut addr = sockaddr_ll(iface_index, 0);
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: the buffer and the address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        sent,
        frame.len() as isize,
        "sending a {}-byte frame: {}",
        frame.len(),
        io::Error::last_os_error()
    );
}
