//! Nothing lost in the blackout (DESIGN.md, "The switchover").
//!
//! - **At the source.** QEMU stops reading its tap when the VM stops, so the frames
//!   that reach the tap between the stop and the flip wait in the tap's queue. Once
//!   QEMU has stopped for good there, they would die with it. The agent takes a copy of
//!   QEMU's tap descriptor (`pidfd_getfd`), reads the queue empty and sends each
//!   packet for `H` to the destination in GUE, where it waits for the VM like the rest.
//! - **At the destination.** Everything the tunnel brings during the blackout waits in
//!   the new tap's queue until the VM runs. The queue is sized for the blackout at the
//!   uplink's rate; what overflows it is counted (`tx_dropped`) and reported.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use movarto_common::{
    config::GUE_DEFAULT_PORT,
    gue::{GUE_FIRST_BYTE, GUE_OVERHEAD_IPV4},
    ids::SessionToken,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::datapath::recorder::TapRecorder;

/// The frames found in the source's tap after the flip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StrandedFrames {
    /// Frames QEMU had not read when the VM stopped there.
    pub found: u64,
    /// Packets for `H` among them, sent on to the destination.
    pub forwarded: u64,
    /// Packets for `H` that could not be sent (too big for the tunnel, or a send error):
    /// lost at switchover.
    pub lost: u64,
    /// Other frames (ARP, neighbour discovery, other addresses): not the VM's traffic to
    /// carry; the VM asks again at the destination.
    pub other: u64,
    /// The one packet QEMU itself read after the stop and holds, undeliverable (its tap
    /// backend reads one more and keeps it queued for the stopped device): 0 or 1, found
    /// by [`probe_held`]; counted in `lost` unless `held_carried`. 0 when QEMU holds the
    /// decoy instead.
    #[serde(default)]
    pub held_by_qemu: u64,
    /// The decoy frame went into the tap at the stop, before the flip
    /// ([`MarkerSocket::send_decoy`]).
    #[serde(default)]
    pub decoy_sent: bool,
    /// The decoy was read back from the queue: QEMU had taken a frame before it.
    #[serde(default)]
    pub decoy_found: bool,
    /// QEMU holds the decoy: the one frame it keeps after the stop is the agent's, and
    /// none of the VM's is lost there.
    #[serde(default)]
    pub held_decoy: bool,
    /// The tap's queue was full when it was read after the stop: frames, the decoy among
    /// them perhaps, were dropped unseen (a tap drops without telling the sender), so the
    /// frame QEMU holds is not claimed to be the decoy.
    #[serde(default)]
    pub queue_full: bool,
    /// QEMU holds one of the VM's packets, and its copy in the tap's recording
    /// (`datapath::recorder`) went on to the destination instead: not lost.
    #[serde(default)]
    pub held_carried: bool,
    /// The recording showed the frame QEMU holds (whatever became of it: carried, or
    /// counted in `lost` or `other`).
    #[serde(default)]
    pub held_seen: bool,
    /// The VM's packet just before the one QEMU holds, sent on again: QEMU either gave
    /// it to the VM before the stop or discarded it at the stop, and does not say which,
    /// so the VM may get it twice (0 or 1; see [`Recording`]). Never a pure TCP ACK.
    #[serde(default)]
    pub sent_again: u64,
    /// The probe for QEMU's held packet was made (once: a second probe would find the
    /// first one held).
    #[serde(default)]
    pub probed: bool,
    /// Probe frames read back (the agent's own, not counted above).
    #[serde(default, skip)]
    pub probes: u64,
}

impl StrandedFrames {
    pub fn add(&mut self, more: StrandedFrames) {
        self.found += more.found;
        self.forwarded += more.forwarded;
        self.lost += more.lost;
        self.other += more.other;
        self.held_by_qemu += more.held_by_qemu;
        self.decoy_sent |= more.decoy_sent;
        self.decoy_found |= more.decoy_found;
        self.held_decoy |= more.held_decoy;
        self.queue_full |= more.queue_full;
        self.held_carried |= more.held_carried;
        self.held_seen |= more.held_seen;
        self.sent_again += more.sent_again;
        self.probed |= more.probed;
    }
}

/// Where the stranded packets go: the tunnel from this site to the destination.
#[derive(Clone, Copy, Debug)]
pub struct TunnelTo {
    pub local: Ipv4Addr,
    pub peer: Ipv4Addr,
    pub token: SessionToken,
    /// The largest outer packet the path between the sites carries.
    pub mtu: u16,
}

/// The tap's recording during the migration, and what it shows around the stop.
///
/// QEMU reads the tap's queue in order. After the stop it reads one frame more and
/// holds it, then reads no more: the held frame is the one that entered the tap just
/// before the first frame the agent reads from the queue. The frame before the held one
/// QEMU either gave the VM while it still ran, or read in the instant of the stop and
/// discarded (`net_vm_change_state_handler` purges its queue; nothing tells which). Both
/// are looked up at the agent's first read, before later frames overwrite them.
pub struct Recording {
    recorder: TapRecorder,
    /// When the VM stopped, in the recording's clock (`CLOCK_MONOTONIC` ns); 0 until
    /// known.
    stopped_ns: AtomicU64,
    /// Set at the first frame read from the queue.
    shown: Mutex<Option<Shown>>,
}

/// What the recording shows of the frames QEMU took at the stop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Shown {
    /// The frame QEMU holds, if recorded whole.
    held: Option<Vec<u8>>,
    /// The frame before it, when it entered the tap within [`DISCARD_WINDOW`] of the stop:
    /// QEMU may have discarded it.
    before_held: Option<Vec<u8>>,
}

/// How long before the stop a frame QEMU discarded at the stop may have entered the
/// tap. QEMU reads its tap as frames come, so the one it read in the instant of the
/// stop (while its vCPUs pause) came at most about that long before; an older one
/// certainly reached the VM.
const DISCARD_WINDOW: Duration = Duration::from_millis(20);

impl Recording {
    pub fn start(tap: &str) -> Result<Self> {
        Ok(Self {
            recorder: TapRecorder::start(tap)?,
            stopped_ns: AtomicU64::new(0),
            shown: Mutex::new(None),
        })
    }

    /// The VM stopped at the source at `at`, as QEMU's `STOP` event says.
    pub fn note_stop_at(&self, at: std::time::SystemTime) {
        let ago = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        let at_ns = monotonic_ns().saturating_sub(ago.as_nanos() as u64);
        self.stopped_ns.store(at_ns, Ordering::Relaxed);
    }

    /// The VM stopped at the source (QEMU's `pre-switchover`, which comes a little after
    /// the stop): only when the `STOP` event did not say when.
    pub fn note_stop(&self) {
        let _ = self.stopped_ns.compare_exchange(
            0,
            monotonic_ns(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// What the recording shows, the first time a frame is read from the queue.
    fn note_queued(&self, ethernet: &[u8]) -> Option<Shown> {
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        if shown.is_some() {
            return None;
        }
        let stopped = self.stopped_ns.load(Ordering::Relaxed);
        // Unknown when the stop was (an agent restarted since): nothing is resent on a guess.
        let since = if stopped == 0 {
            u64::MAX
        } else {
            stopped.saturating_sub(DISCARD_WINDOW.as_nanos() as u64)
        };
        *shown = Some(match self.recorder.frames() {
            Ok(frames) => around_held(
                frames.iter().map(|f| (f.ktime_ns, f.frame())),
                ethernet,
                since,
            ),
            Err(err) => {
                tracing::warn!("reading the tap's recording: {err:#}");
                Shown::default()
            }
        });
        shown.clone()
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// The frames recorded just before the latest one equal to `first_queued` (frames oldest
/// first, with the time each entered the tap; `None` stands for one cut short): the
/// held one, and the one before it if it entered no earlier than `since` ns.
fn around_held<'a>(
    frames: impl DoubleEndedIterator<Item = (u64, Option<&'a [u8]>)>,
    first_queued: &[u8],
    since: u64,
) -> Shown {
    let mut newest_first = frames.rev();
    if newest_first
        .find(|(_, frame)| *frame == Some(first_queued))
        .is_none()
    {
        return Shown::default();
    }
    let held = newest_first.next();
    let before = newest_first.next();
    Shown {
        held: held.and_then(|(_, f)| f).map(<[u8]>::to_vec),
        before_held: before
            .filter(|(at, _)| *at >= since)
            .and_then(|(_, f)| f)
            .map(<[u8]>::to_vec),
    }
}

/// Reads the frames waiting in `tap`'s queue, held by QEMU (`qemu_pid`), and sends each
/// packet for `home` to the peer in GUE. Call it only once QEMU no longer reads the tap
/// (the VM stopped for the switchover) and the datapath forwards: nothing else
/// enters the queue then.
pub fn forward_stranded(
    qemu_pid: u32,
    tap: &str,
    home: IpAddr,
    tunnel: TunnelTo,
    recording: Option<&Recording>,
) -> Result<StrandedFrames> {
    let drain = Drain::open(qemu_pid, tap, home, tunnel, recording)?;
    let mut seen = StrandedFrames::default();
    drain.read_empty(&mut seen)?;
    let queued = seen.found + u64::from(seen.decoy_found);
    seen.queue_full = queued >= u64::from(super::netlink::tx_queue_len(tap)?);
    Ok(seen)
}

/// [`forward_stranded`] once QEMU has completed (`postmigrate`: its main loop runs
/// again), and whether QEMU holds a packet of its own. A probe frame goes into the tap:
/// a QEMU that holds nothing reads it (and holds it instead, harmlessly); a QEMU that
/// holds a frame reads nothing more, and the probe is found in the queue. The frame it
/// holds is the decoy when the decoy went in (`earlier.decoy_sent`) and was never found
/// in the queue. A packet of the VM's that QEMU holds goes on to the destination from
/// the tap's `recording`.
pub fn probe_held(
    qemu_pid: u32,
    tap: &str,
    vm_mac: [u8; 6],
    home: IpAddr,
    tunnel: TunnelTo,
    earlier: StrandedFrames,
    recording: Option<&Recording>,
) -> Result<StrandedFrames> {
    let drain = Drain::open(qemu_pid, tap, home, tunnel, recording)?;
    let mut seen = StrandedFrames::default();
    drain.read_empty(&mut seen)?;
    let read_before = super::netlink::tx_packets(tap)?;
    MarkerSocket::open(tap, vm_mac)?.send(PROBE_PAYLOAD)?;
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    let mut taken = false;
    while std::time::Instant::now() < deadline {
        if super::netlink::tx_packets(tap)? > read_before {
            taken = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let probes_before = seen.probes;
    drain.read_empty(&mut seen)?;
    let probe_left = seen.probes > probes_before;
    seen.probed = true;
    let decoy_held =
        earlier.decoy_sent && !earlier.queue_full && !(earlier.decoy_found || seen.decoy_found);
    if !taken && !probe_left {
        bail!("the probe frame into {tap} was neither read by QEMU nor left in its queue");
    }
    if taken {
        return Ok(seen);
    }
    // QEMU holds a frame: the decoy, or one of the VM's, which went on from the recording
    // at the agent's first read of the queue (`Drain::read_empty`) if it showed it.
    if decoy_held {
        seen.held_decoy = true;
    } else {
        seen.held_by_qemu = 1;
        if !(earlier.held_seen || seen.held_seen) {
            seen.lost += 1;
        }
    }
    Ok(seen)
}

/// How long QEMU has to read the probe frame, its main loop being free.
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// The probe's and the decoy's EtherType (IEEE 802 local experimental) and payloads.
const PROBE_ETHERTYPE: u16 = 0x88b5;
const PROBE_PAYLOAD: &[u8] = b"movarto: is a packet held?";
const DECOY_PAYLOAD: &[u8] = b"movarto: a decoy for the stop";

/// A socket that sends frames of the agent's own into a tap, toward the VM (AF_PACKET).
/// Opened ahead of the blackout and closed after it: closing a packet socket waits for
/// the kernel's RCU grace period (`synchronize_net`), milliseconds.
pub struct MarkerSocket {
    socket: OwnedFd,
    to: libc::sockaddr_ll,
    tap: String,
    vm_mac: [u8; 6],
}

impl MarkerSocket {
    pub fn open(tap: &str, vm_mac: [u8; 6]) -> Result<Self> {
        let index = crate::datapath::ifindex(tap)?;
        // SAFETY: socket(2) returns a new descriptor or -1. Protocol 0: it receives
        // nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("an AF_PACKET socket");
        }
        // SAFETY: a descriptor just returned, owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&vm_mac);
        Ok(Self {
            socket,
            to,
            tap: tap.to_owned(),
            vm_mac,
        })
    }

    /// The decoy goes into the source's tap at the stop, before the flip, so that it is
    /// first in the queue: QEMU's tap backend reads one frame after the stop and holds
    /// it, and when that is the decoy, none of the VM's is held. A frame that came
    /// between the stop and the decoy is read first instead (and the decoy is found in
    /// the queue).
    pub fn send_decoy(&self) -> Result<()> {
        self.send(DECOY_PAYLOAD)
    }

    fn send(&self, payload: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(64);
        frame.extend_from_slice(&self.vm_mac);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(&PROBE_ETHERTYPE.to_be_bytes());
        frame.extend_from_slice(payload);
        frame.resize(60, 0);
        // SAFETY: a socket descriptor, a frame buffer of the length given and a
        // sockaddr_ll of the size given.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const self.to).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error())
                .context(format!("a frame into {}", self.tap));
        }
        Ok(())
    }
}

/// One reading of QEMU's tap queue (a copy of its descriptor).
struct Drain<'a> {
    queue: OwnedFd,
    /// The virtio-net header's length before each frame.
    vnet_hdr: usize,
    tap: &'a str,
    home: IpAddr,
    tunnel: TunnelTo,
    recording: Option<&'a Recording>,
}

impl<'a> Drain<'a> {
    fn open(
        qemu_pid: u32,
        tap: &'a str,
        home: IpAddr,
        tunnel: TunnelTo,
        recording: Option<&'a Recording>,
    ) -> Result<Self> {
        let fd = qemu_tap_fd(qemu_pid, tap)?;
        let queue = take_fd(qemu_pid, fd)?;
        // QEMU reads the tap with a virtio-net header before each frame.
        let vnet_hdr = vnet_header_len(&queue).with_context(|| format!("{tap}'s flags"))?;
        Ok(Self {
            queue,
            vnet_hdr,
            tap,
            home,
            tunnel,
            recording,
        })
    }
}

impl Drain<'_> {
    /// Reads the queue empty, sending each packet for `home` on; counts into `seen`.
    fn read_empty(&self, seen: &mut StrandedFrames) -> Result<()> {
        let socket = tunnel_socket(self.tunnel)?;
        let mut frame = vec![0u8; 65_536];
        let tap = self.tap;
        // The copy shares QEMU's open file, flags included: poll before each read rather
        // than change them under QEMU, so an empty queue never blocks.
        while queued(&self.queue).with_context(|| format!("polling {tap}'s queue"))? {
            let len = match nix::unistd::read(&self.queue, &mut frame) {
                Ok(0) => break,
                Ok(len) => len,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err).context(format!("reading {tap}'s queue")),
            };
            let Some(ethernet) = frame[..len].get(self.vnet_hdr..) else {
                continue;
            };
            if let Some(shown) = self.recording.and_then(|r| r.note_queued(ethernet)) {
                self.carry_around_held(&socket, shown, seen);
            }
            if is_marker(ethernet, PROBE_PAYLOAD) {
                seen.probes += 1;
                continue;
            }
            if is_marker(ethernet, DECOY_PAYLOAD) {
                seen.decoy_found = true;
                continue;
            }
            seen.found += 1;
            match self.carry(&socket, ethernet) {
                Some(true) => seen.forwarded += 1,
                Some(false) => seen.lost += 1,
                None => seen.other += 1,
            }
        }
        Ok(())
    }

    /// The frame QEMU holds goes on to the destination at once, unless it is the decoy;
    /// so does the one before it, which QEMU may have discarded at the stop (sent again
    /// rather than lost, at the risk of the VM's getting it twice).
    fn carry_around_held(&self, socket: &UdpSocket, shown: Shown, seen: &mut StrandedFrames) {
        if let Some(held) = shown.held.filter(|f| !is_marker(f, DECOY_PAYLOAD)) {
            seen.held_seen = true;
            match self.carry(socket, &held) {
                Some(true) => seen.held_carried = true,
                Some(false) => seen.lost += 1,
                // Not the VM's traffic (ARP, another address): the VM asks again.
                None => seen.other += 1,
            }
        }
        // Not a pure TCP ACK: the next ACK covers a lost one, and a stale copy arriving
        // after newer ones could move the sender's window (RFC 9293's SND.WL1 rule).
        if let Some(before) = shown
            .before_held
            .filter(|f| !is_marker(f, DECOY_PAYLOAD) && !is_pure_tcp_ack(f))
            && self.carry(socket, &before) == Some(true)
        {
            seen.sent_again += 1;
        }
    }

    /// Sends the packet in `ethernet` on in GUE when it is for `home`: `None` when it is
    /// not, else whether it went.
    fn carry(&self, socket: &UdpSocket, ethernet: &[u8]) -> Option<bool> {
        let inner = packet_for(ethernet, self.home)?;
        if inner.len() + GUE_OVERHEAD_IPV4 > usize::from(self.tunnel.mtu) {
            return Some(false);
        }
        let mut datagram = Vec::with_capacity(inner.len() + GUE_OVERHEAD_IPV4);
        datagram.extend_from_slice(&[GUE_FIRST_BYTE, gue_proto(inner), 0, 0]);
        datagram.extend_from_slice(&self.tunnel.token.0.to_be_bytes());
        datagram.extend_from_slice(inner);
        match socket.send(&datagram) {
            Ok(_) => Some(true),
            Err(err) => {
                tracing::warn!("a stranded packet for {}: {err}", self.home);
                Some(false)
            }
        }
    }
}

fn is_marker(ethernet: &[u8], payload: &[u8]) -> bool {
    ethernet.get(12..14) == Some(&PROBE_ETHERTYPE.to_be_bytes()[..])
        && ethernet.get(14..).is_some_and(|p| p.starts_with(payload))
}

/// The IP packet in an Ethernet `frame` when it is addressed to `home`.
fn packet_for(frame: &[u8], home: IpAddr) -> Option<&[u8]> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let packet = frame.get(14..)?;
    let dst: IpAddr = match ethertype {
        0x0800 => <[u8; 4]>::try_from(packet.get(16..20)?).ok()?.into(),
        0x86dd => <[u8; 16]>::try_from(packet.get(24..40)?).ok()?.into(),
        _ => return None,
    };
    (dst == home).then_some(packet)
}

/// Whether the Ethernet `frame` holds a TCP segment without data, SYN, FIN or RST.
fn is_pure_tcp_ack(frame: &[u8]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let Some(packet) = frame.get(14..) else {
        return false;
    };
    let (tcp, ip_payload_len) = match ethertype {
        [0x08, 0x00] => {
            let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
            let total = packet
                .get(2..4)
                .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            if packet.get(9) != Some(&6) || ihl < 20 || total < ihl {
                return false;
            }
            (packet.get(ihl..), total - ihl)
        }
        // Only a TCP header right after the fixed one: extension headers are not read.
        [0x86, 0xdd] => {
            let payload = packet
                .get(4..6)
                .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            if packet.get(6) != Some(&6) {
                return false;
            }
            (packet.get(40..), payload)
        }
        _ => return false,
    };
    let Some(tcp) = tcp else {
        return false;
    };
    let (Some(offset), Some(flags)) = (tcp.get(12), tcp.get(13)) else {
        return false;
    };
    const FIN_SYN_RST: u8 = 0x07;
    usize::from(offset >> 4) * 4 == ip_payload_len && flags & FIN_SYN_RST == 0
}

/// GUE's proto field for an inner packet: 4 (IPv4) or 41 (IPv6).
fn gue_proto(inner: &[u8]) -> u8 {
    if inner.first().is_some_and(|b| b >> 4 == 6) {
        41
    } else {
        4
    }
}

/// A UDP socket from the local tunnel address to the peer's GUE port. DF set, never
/// fragmented here: the datapath at the peer takes no fragments.
fn tunnel_socket(tunnel: TunnelTo) -> Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddrV4::new(tunnel.local, 0))
        .with_context(|| format!("binding a UDP socket to {}", tunnel.local))?;
    let pmtu_do = libc::IP_PMTUDISC_DO;
    // SAFETY: a valid socket descriptor, and an int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const pmtu_do).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_MTU_DISCOVER");
    }
    socket
        .connect(SocketAddrV4::new(tunnel.peer, GUE_DEFAULT_PORT))
        .with_context(|| format!("a UDP socket to {}:{GUE_DEFAULT_PORT}", tunnel.peer))?;
    Ok(socket)
}

/// The descriptor number under which QEMU (`pid`) holds `tap` (its `/proc` fdinfo names
/// the interface: `iff: tap0`).
fn qemu_tap_fd(pid: u32, tap: &str) -> Result<RawFd> {
    let fds = Path::new("/proc").join(pid.to_string()).join("fd");
    let entries = fs::read_dir(&fds).with_context(|| format!("listing {}", fds.display()))?;
    for entry in entries.flatten() {
        let is_tun = fs::read_link(entry.path()).is_ok_and(|to| to == Path::new("/dev/net/tun"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_tun {
            continue;
        }
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        if info.lines().any(|line| {
            line.strip_prefix("iff:")
                .is_some_and(|name| name.trim() == tap)
        }) {
            return Ok(fd);
        }
    }
    bail!("QEMU (PID {pid}) holds no descriptor of {tap}")
}

/// A copy of descriptor `fd` of process `pid`, non-blocking.
fn take_fd(pid: u32, fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pidfd_open({pid})"));
    }
    // SAFETY: a descriptor the call above just returned, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd takes a pidfd, the target's descriptor number and flags 0; it
    // returns a new descriptor (close-on-exec) or -1.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("pidfd_getfd(PID {pid}, fd {fd})"));
    }
    // SAFETY: as above, a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as RawFd) })
}

const IFF_VNET_HDR: libc::c_short = 0x4000;

// <linux/if_tun.h>: TUNGETIFF writes a whole `struct ifreq` although its code names an
// unsigned int; TUNGETVNETHDRSZ writes an int.
nix::ioctl_read_bad!(
    tun_get_iff,
    nix::request_code_read!(b'T', 210, size_of::<libc::c_uint>()),
    libc::ifreq
);
nix::ioctl_read_bad!(
    tun_get_vnet_hdr_sz,
    nix::request_code_read!(b'T', 215, size_of::<libc::c_int>()),
    libc::c_int
);

/// How many bytes of virtio-net header precede each frame read from `queue` (0 when the
/// tap has none).
fn vnet_header_len(queue: &OwnedFd) -> Result<usize> {
    // SAFETY: an all-zero ifreq is valid; the kernel fills it in.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: an open tun descriptor and a whole ifreq for TUNGETIFF to write.
    unsafe { tun_get_iff(queue.as_raw_fd(), &mut ifr) }.context("TUNGETIFF")?;
    // SAFETY: TUNGETIFF sets the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    if flags & IFF_VNET_HDR == 0 {
        return Ok(0);
    }
    let mut len: libc::c_int = 0;
    // SAFETY: an open tun descriptor and an int for TUNGETVNETHDRSZ to write.
    unsafe { tun_get_vnet_hdr_sz(queue.as_raw_fd(), &mut len) }.context("TUNGETVNETHDRSZ")?;
    usize::try_from(len).context("a negative vnet header size")
}

/// Whether a frame waits in the queue (a poll that does not wait).
fn queued(queue: &OwnedFd) -> nix::Result<bool> {
    use std::os::fd::AsFd as _;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(queue.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(ready) => {
                return Ok(ready > 0
                    && fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLIN)));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(err),
        }
    }
}

/// Drops counted at `tap` so far (its queue was full): `tx_dropped` of its link
/// statistics, asked over rtnetlink (`/sys` may show another namespace's devices).
pub async fn tap_dropped(tap: &str) -> Option<u64> {
    super::netlink::tx_dropped(tap).await.ok()
}

/// Frames a tap must hold to wait out `blackout` at `uplink`'s rate (ethtool's speed,
/// 10 Gbit/s when the driver gives none), counted as full-size frames; at least the
/// kernel's default of 1,000, at most 2^18 (2 MiB of the queue's pointers, allocated
/// in one piece: 2^20 fails here with ENOMEM; at 10 Gbit/s 2^18 holds 317 ms).
pub fn queue_for_blackout(uplink: &str, blackout: Duration) -> u32 {
    frames_for(link_speed_mbit(uplink).unwrap_or(10_000), blackout)
}

/// `struct ethtool_cmd` (<linux/ethtool.h>), for `ETHTOOL_GSET`.
#[repr(C)]
#[derive(Default)]
struct EthtoolCmd {
    cmd: u32,
    supported: u32,
    advertising: u32,
    speed: u16,
    duplex: u8,
    port: u8,
    phy_address: u8,
    transceiver: u8,
    autoneg: u8,
    mdio_support: u8,
    maxtxpkt: u32,
    maxrxpkt: u32,
    speed_hi: u16,
    eth_tp_mdix: u8,
    eth_tp_mdix_ctrl: u8,
    lp_advertising: u32,
    reserved: [u32; 2],
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSET: u32 = 1;

/// `iface`'s link speed in Mbit/s, as `ethtool IFACE` shows it; `None` when unknown.
fn link_speed_mbit(iface: &str) -> Option<u64> {
    // Any socket of this namespace serves for the ioctl.
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    let mut cmd = EthtoolCmd {
        cmd: ETHTOOL_GSET,
        ..EthtoolCmd::default()
    };
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return None;
    }
    for (to, from) in ifr.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut cmd).cast();
    // SAFETY: a socket descriptor, an ifreq naming the interface and pointing at an
    // ethtool_cmd that outlives the call.
    let done = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut ifr) };
    let speed = u32::from(cmd.speed) | (u32::from(cmd.speed_hi) << 16);
    (done == 0 && speed != 0 && speed != u32::MAX).then_some(u64::from(speed))
}

const MOST_FRAMES: u128 = 1 << 18;

fn frames_for(mbit_s: u64, blackout: Duration) -> u32 {
    const FULL_FRAME_BITS: u64 = 1514 * 8;
    let bits = mbit_s as u128 * 1_000_000 * blackout.as_millis() / 1000;
    let frames = bits.div_ceil(u128::from(FULL_FRAME_BITS));
    frames.clamp(1000, MOST_FRAMES) as u32
}

/// `tap`'s queue length, in frames (`ip link set TAP txqueuelen N`); a tap re-sizes its
/// queue to it at once.
pub async fn set_queue_len(tap: &str, frames: u32) -> Result<()> {
    let index = crate::datapath::ifindex(tap)?;
    super::netlink::session(|handle| async move {
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(index)
                    .append_extra_attribute(
                        rtnetlink::packet_route::link::LinkAttribute::TxQueueLen(frames),
                    )
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("setting {tap}'s queue to {frames} frames"))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ethertype: u16, packet: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(packet);
        f
    }

    #[test]
    fn only_ip_packets_for_the_home_address_are_carried() {
        let mut v4 = vec![0x45u8; 20];
        v4[16..20].copy_from_slice(&[192, 0, 2, 10]);
        let home: IpAddr = "192.0.2.10".parse().expect("ip");
        assert_eq!(packet_for(&frame(0x0800, &v4), home), Some(&v4[..]));
        assert_eq!(packet_for(&frame(0x0806, &v4), home), None, "ARP");
        let other: IpAddr = "192.0.2.11".parse().expect("ip");
        assert_eq!(packet_for(&frame(0x0800, &v4), other), None);
        assert_eq!(packet_for(&frame(0x0800, &v4[..10]), home), None, "short");
        let mut v6 = vec![0x60u8; 40];
        let home6: IpAddr = "2001:db8::10".parse().expect("ip");
        let IpAddr::V6(a) = home6 else { unreachable!() };
        v6[24..40].copy_from_slice(&a.octets());
        assert_eq!(packet_for(&frame(0x86dd, &v6), home6), Some(&v6[..]));
        assert_eq!(gue_proto(&v6), 41);
        assert_eq!(gue_proto(&v4), 4);
    }

    #[test]
    fn the_probe_and_the_decoy_are_known_apart_and_nothing_else_is() {
        let mut probe = frame(PROBE_ETHERTYPE, PROBE_PAYLOAD);
        probe.resize(60, 0);
        assert!(is_marker(&probe, PROBE_PAYLOAD));
        assert!(!is_marker(&probe, DECOY_PAYLOAD));
        let decoy = frame(PROBE_ETHERTYPE, DECOY_PAYLOAD);
        assert!(is_marker(&decoy, DECOY_PAYLOAD));
        assert!(!is_marker(&decoy, PROBE_PAYLOAD));
        assert!(!is_marker(
            &frame(PROBE_ETHERTYPE, b"someone else's"),
            PROBE_PAYLOAD
        ));
        assert!(!is_marker(&frame(0x0800, PROBE_PAYLOAD), PROBE_PAYLOAD));
        assert!(!is_marker(&probe[..13], PROBE_PAYLOAD));
    }

    #[test]
    fn the_held_frame_is_the_one_recorded_before_the_first_queued() {
        let (a, b, c, d): (&[u8], &[u8], &[u8], &[u8]) = (b"a", b"b", b"c", b"d");
        let shown = |frames: &[(u64, Option<&'static [u8]>)], first: &[u8], since| {
            around_held(frames.iter().copied(), first, since)
        };
        let v = |f: &[u8]| Some(f.to_vec());
        let recorded = [(1, Some(a)), (2, Some(b)), (3, Some(c)), (4, Some(d))];
        assert_eq!(
            shown(&recorded, d, 0),
            Shown {
                held: v(c),
                before_held: v(b)
            }
        );
        assert_eq!(
            shown(&recorded, d, 3).before_held,
            None,
            "b came before the window"
        );
        assert_eq!(shown(&recorded, b, 0).held, v(a));
        assert_eq!(shown(&recorded, b, 0).before_held, None, "nothing before a");
        assert_eq!(shown(&recorded, a, 0), Shown::default(), "nothing before");
        assert_eq!(shown(&recorded, b"e", 0), Shown::default(), "not recorded");
        // The same bytes twice (a retransmission): the later copy is the queued one.
        let again = [(1, Some(a)), (2, Some(c)), (3, Some(b)), (4, Some(c))];
        assert_eq!(shown(&again, c, 0).held, v(b));
        let cut = [(1, Some(a)), (2, None), (3, Some(c))];
        assert_eq!(
            shown(&cut, c, 0),
            Shown {
                held: None,
                before_held: v(a)
            },
            "cut short"
        );
    }

    #[test]
    fn only_a_tcp_segment_without_data_or_syn_fin_rst_is_a_pure_ack() {
        // IPv4 (20 bytes) and TCP (20 bytes), ACK only, no data.
        let mut v4 = vec![0u8; 40];
        v4[0] = 0x45;
        v4[2..4].copy_from_slice(&40u16.to_be_bytes());
        v4[9] = 6;
        v4[20 + 12] = 5 << 4;
        v4[20 + 13] = 0x10;
        assert!(is_pure_tcp_ack(&frame(0x0800, &v4)));
        let mut data = v4.clone();
        data[2..4].copy_from_slice(&41u16.to_be_bytes());
        data.push(b'x');
        assert!(!is_pure_tcp_ack(&frame(0x0800, &data)), "one byte of data");
        let mut fin = v4.clone();
        fin[20 + 13] = 0x11;
        assert!(!is_pure_tcp_ack(&frame(0x0800, &fin)), "a FIN");
        let mut udp = v4.clone();
        udp[9] = 17;
        assert!(!is_pure_tcp_ack(&frame(0x0800, &udp)), "UDP");
        assert!(!is_pure_tcp_ack(&frame(0x0800, &v4[..25])), "cut short");
        // IPv6 (40 bytes) and TCP (20 bytes).
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&20u16.to_be_bytes());
        v6[6] = 6;
        v6[40 + 12] = 5 << 4;
        v6[40 + 13] = 0x10;
        assert!(is_pure_tcp_ack(&frame(0x86dd, &v6)));
        v6[40 + 13] = 0x12;
        assert!(!is_pure_tcp_ack(&frame(0x86dd, &v6)), "a SYN-ACK");
    }

    #[test]
    fn stranded_counts_add_up() {
        let mut total = StrandedFrames {
            found: 3,
            forwarded: 2,
            other: 1,
            ..StrandedFrames::default()
        };
        total.add(StrandedFrames {
            found: 1,
            lost: 1,
            held_by_qemu: 1,
            probed: true,
            ..StrandedFrames::default()
        });
        assert_eq!(
            (total.found, total.forwarded, total.lost, total.other),
            (4, 2, 1, 1)
        );
        assert_eq!(total.held_by_qemu, 1);
        assert!(total.probed);
    }

    #[test]
    fn the_queue_holds_the_blackout_at_the_link_rate() {
        // 200 Mbit/s for 1.3 s: 260 Mbit of full-size frames.
        assert_eq!(frames_for(200, Duration::from_millis(1300)), 21_467);
        assert_eq!(frames_for(1, Duration::from_millis(100)), 1000, "the floor");
        assert_eq!(
            frames_for(100_000, Duration::from_secs(10)),
            1 << 18,
            "the ceiling"
        );
    }
}
