//! The one test of whether bytes are all zero, shared by the engine's zero detection and the
//! qcow2 writer (which stores an all-zero cluster as a zero cluster).

/// True when every byte of `data` is zero (an empty slice is).
///
/// Folds 64 bytes at a time so that the compiler vectorizes, and stops at the first 64 bytes
/// holding data. Of the two versions this replaces (the engine's, by 64 bytes, and the qcow2
/// writer's, by 4 KiB), the 64-byte one was kept: both test all-zero data at many GB/s, far
/// above what a copy reads, but data is found within nanoseconds instead of after scanning up
/// to 4 KiB, and most of what the qcow2 writer tests is data the engine already found non-zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_checks_every_byte() {
        assert!(is_zero(&[]));
        // Short data (the remainder alone), then data past many whole 64-byte blocks.
        for len in [200, 70_000] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            for at in [3, len / 2, len - 1] {
                v[at] = 1;
                assert!(!is_zero(&v), "non-zero byte {at} of {len} missed");
                v[at] = 0;
            }
        }
    }
}
