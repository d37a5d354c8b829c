//! COCO run-length encoding of binary masks.
//!
//! COCO's RLE walks the mask in column-major order (down each column, columns left to right,
//! Fortran order, as pycocotools' `mask.encode` takes it) and lists run lengths alternating
//! between 0s and 1s, starting with a run of 0s (possibly empty). The compressed string form
//! stores each count (after the third, as the difference from the count two before) in 5-bit
//! groups, least significant first, offset by 48 into printable ASCII, 0x20 marking "more
//! groups follow", the last group sign-extended from its bit 4.

/// Errors decoding RLE: what is wrong, the caller names the file and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RleError {
    #[error("the counts add up to {sum}, but the mask has {expected} pixels ({height}x{width})")]
    WrongTotal {
        sum: u64,
        expected: u64,
        height: u32,
        width: u32,
    },
    #[error("invalid character {0:?} in compressed RLE counts")]
    BadCharacter(char),
    #[error("compressed RLE counts end in the middle of a number")]
    Truncated,
    #[error("compressed RLE count {0} is negative or too large")]
    BadCount(i64),
}

/// Encodes a row-major binary mask (`height` rows of `width`) to uncompressed COCO counts.
pub fn encode(mask: &[bool], width: u32, height: u32) -> Vec<u32> {
    let (w, h) = (width as usize, height as usize);
    debug_assert_eq!(mask.len(), w * h);
    let mut counts = Vec::new();
    let mut current = false;
    let mut run = 0u32;
    for x in 0..w {
        for y in 0..h {
            let v = mask[y * w + x];
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// Decodes uncompressed counts to a row-major binary mask.
pub fn decode(counts: &[u32], width: u32, height: u32) -> Result<Vec<bool>, RleError> {
    let (w, h) = (width as usize, height as usize);
    let expected = w as u64 * h as u64;
    let sum: u64 = counts.iter().map(|&c| c as u64).sum();
    if sum != expected {
        return Err(RleError::WrongTotal {
            sum,
            expected,
            height,
            width,
        });
    }
    let mut mask = vec![false; w * h];
    let mut position = 0usize;
    for (i, &c) in counts.iter().enumerate() {
        let value = i % 2 == 1;
        for p in position..position + c as usize {
            if value {
                let (x, y) = (p / h, p % h);
                mask[y * w + x] = true;
            }
        }
        position += c as usize;
    }
    Ok(mask)
}

/// Decodes COCO's compressed counts string to uncompressed counts.
pub fn decompress_counts(text: &str) -> Result<Vec<u32>, RleError> {
    let bytes = text.as_bytes();
    let mut counts: Vec<i64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut value: i64 = 0;
        let mut shift = 0;
        loop {
            let Some(&byte) = bytes.get(p) else {
                return Err(RleError::Truncated);
            };
            if !(48..48 + 64).contains(&byte) {
                return Err(RleError::BadCharacter(byte as char));
            }
            if shift > 60 {
                return Err(RleError::BadCount(value));
            }
            let c = (byte - 48) as i64;
            value |= (c & 0x1f) << shift;
            p += 1;
            shift += 5;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    value |= -1i64 << shift;
                }
                break;
            }
        }
        if counts.len() > 2 {
            value += counts[counts.len() - 2];
        }
        counts.push(value);
    }
    counts
        .into_iter()
        .map(|c| u32::try_from(c).map_err(|_| RleError::BadCount(c)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_column_major_starting_with_zeros() {
        // 2 rows x 3 columns:
        // 1 0 1
        // 1 0 0
        let mask = [true, false, true, true, false, false];
        // Column-major: 1 1 | 0 0 | 1 0
        assert_eq!(encode(&mask, 3, 2), vec![0, 2, 2, 1, 1]);
        assert_eq!(decode(&[0, 2, 2, 1, 1], 3, 2).unwrap(), mask);
        assert_eq!(encode(&[false; 4], 2, 2), vec![4]);
        assert!(matches!(
            decode(&[1, 2], 2, 2),
            Err(RleError::WrongTotal { sum: 3, .. })
        ));
    }

    #[test]
    fn decompresses_pycocotools_strings() {
        // pycocotools.mask.encode of a 4x5 (h x w) Fortran-order mask with a 2x3 block at
        // rows 1..3, columns 1..4: uncompressed [5, 2, 2, 2, 2, 2, 5], compressed "5220003".
        assert_eq!(
            decompress_counts("5220003").unwrap(),
            vec![5, 2, 2, 2, 2, 2, 5]
        );
        assert!(matches!(decompress_counts("5 "), Err(RleError::BadCharacter(' '))));
        assert_eq!(decompress_counts("P"), Err(RleError::Truncated));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(w in 1u32..9, h in 1u32..9, seed in any::<u64>()) {
            let mask: Vec<bool> = (0..w * h).map(|i| (seed >> (i % 64)) & 1 == 1).collect();
            let counts = encode(&mask, w, h);
            prop_assert_eq!(counts.iter().sum::<u32>(), w * h);
            prop_assert_eq!(decode(&counts, w, h).unwrap(), mask);
        }

        #[test]
        fn decompress_never_panics(text in "\\PC{0,40}") {
            let _ = decompress_counts(&text);
        }
    }
}
