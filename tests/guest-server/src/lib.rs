//! What the test guest's server and its clients share: ports and the stream pattern.

pub const ECHO_PORT: u16 = 7;
pub const STREAM_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 80;
/// A byte-checked upload sink: the client sends the stream pattern in chunks of
/// [`UPLOAD_CHUNK`] bytes; after each whole chunk the guest answers with the number of bytes
/// it has checked so far (8 bytes, little-endian), or [`UPLOAD_BAD`] and closes on a wrong byte.
pub const UPLOAD_PORT: u16 = 7002;
pub const UPLOAD_CHUNK: usize = 16 * 1024;
pub const UPLOAD_BAD: u64 = u64::MAX;

/// Byte `offset` of the stream pattern: the low byte of a 64-bit mix of the offset's
/// 8-byte word index, so every shift by whole words is detected, not only by 256 bytes.
pub fn stream_byte(offset: u64) -> u8 {
    let word = offset / 8;
    let mixed = word.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (word >> 7);
    mixed.to_le_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the pattern starting at `offset`.
pub fn fill_stream(buf: &mut [u8], offset: u64) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = stream_byte(offset + i as u64);
    }
}

/// The device the guest's optional disk appears as (virtio-blk).
pub const DISK_DEVICE: &str = "/dev/vda";

/// Byte `offset` of the disk pattern number `seed`: the stream pattern moved far apart per
/// seed, so data written with one seed never matches another's.
pub fn disk_byte(seed: u64, offset: u64) -> u8 {
    stream_byte(offset.wrapping_add(seed.wrapping_mul(1 << 40)))
}

/// Fills `buf` with disk pattern `seed` starting at `offset`.
pub fn fill_disk(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = disk_byte(seed, offset + i as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_shifts_by_a_word() {
        let a: Vec<u8> = (0..64).map(stream_byte).collect();
        let b: Vec<u8> = (8..72).map(stream_byte).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn disk_patterns_differ_per_seed() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_disk(&mut a, 1, 4096);
        fill_disk(&mut b, 2, 4096);
        assert_ne!(a, b);
        assert_eq!(a[0], disk_byte(1, 4096));
    }
}
