//! The frames last sent into a VM's tap, recorded during a migration at the source
//! (`movarto-ebpf/src/bin/recorder.rs`). QEMU's tap backend reads one frame after the
//! VM stops and holds it for the stopped device; the recording is how the source's
//! agent finds that frame's bytes and carries it on to the destination.

/// The bytes of a frame kept: a full-size Ethernet frame and more. A longer frame (a
/// GSO one) is kept cut short and marked so; it cannot be carried on.
pub const RECORDED_BYTES: u32 = 2048;

/// Slots per CPU in the recording. Each CPU writes its own slots in turn (no atomics);
/// the loader makes the map `possible CPUs × FRAMES_PER_CPU` long.
pub const FRAMES_PER_CPU: u32 = 128;

/// One recorded frame, from its Ethernet header on.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RecordedFrame {
    /// `bpf_ktime_get_ns` when the frame entered the tap: the order across CPUs. 0 for
    /// a slot never written, or one being written.
    pub ktime_ns: u64,
    /// The frame's whole length (more than [`RECORDED_BYTES`] when cut short).
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; RECORDED_BYTES as usize],
}

impl RecordedFrame {
    /// The recorded bytes; `None` when the frame was cut short.
    pub fn frame(&self) -> Option<&[u8]> {
        self.data.get(..self.len as usize)
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
unsafe impl aya::Pod for RecordedFrame {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_cut_short_is_not_offered() {
        let mut slot = RecordedFrame {
            ktime_ns: 1,
            len: 60,
            _pad: 0,
            data: [7; RECORDED_BYTES as usize],
        };
        assert_eq!(slot.frame().map(<[u8]>::len), Some(60));
        slot.len = RECORDED_BYTES + 1;
        assert!(slot.frame().is_none());
        assert_eq!(core::mem::size_of::<RecordedFrame>(), 16 + 2048);
    }
}
