//! What the test guest's server and its clients share: ports and the stream pattern.

pub const ECHO_PORT: u16 = 7;
pub const STREAM_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 80;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_shifts_by_a_word() {
        let a: Vec<u8> = (0..64).map(stream_byte).collect();
        let b: Vec<u8> = (8..72).map(stream_byte).collect();
        assert_ne!(a, b);
    }
}
