//! Decoder for the LZ4 "legacy" frame format, which Linux uses for LZ4-compressed kernels
//! (`CONFIG_KERNEL_LZ4`, Debian's default) and which `lz4 -l` writes.
//!
//! ```text
//! magic 0x184c2102 (LE) | { compressed size (u32 LE) | LZ4 block } ...
//! ```
//!
//! Each block decodes to at most 8 MiB. A block is a run of sequences: a token (literal
//! length in the high nibble, match length minus 4 in the low nibble, 15 meaning "more
//! bytes follow"), the literals, then a 2-byte back-reference offset and the extra match
//! length bytes. The last sequence has literals only.

/// Magic number that starts a legacy frame.
pub const LEGACY_MAGIC: u32 = 0x184c_2102;
/// Largest decoded size of one legacy block.
pub const LEGACY_BLOCK_SIZE: usize = 8 << 20;
const MIN_MATCH: usize = 4;

/// Reason a stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lz4Error {
    #[error("LZ4 stream does not start with the legacy magic 0x184c2102")]
    BadMagic,
    #[error(
        "LZ4 block at input offset {offset:#x} claims {size} bytes, but only {available} remain"
    )]
    TruncatedBlock {
        offset: usize,
        size: usize,
        available: usize,
    },
    #[error("LZ4 block at input offset {offset:#x} is corrupt: {reason}")]
    CorruptBlock { offset: usize, reason: &'static str },
    #[error("LZ4 output would exceed the {limit}-byte limit")]
    TooLarge { limit: usize },
}

/// Decodes a legacy-frame stream into at most `limit` bytes.
///
/// The stream may end with a 4-byte trailer that is not a block, as in the kernel's
/// payload, where the build appends the decompressed size.
pub fn decode_legacy(input: &[u8], limit: usize) -> Result<Vec<u8>, Lz4Error> {
    if input.len() < 4 || read_u32(input, 0) != LEGACY_MAGIC {
        return Err(Lz4Error::BadMagic);
    }
    let mut output = Vec::new();
    let mut offset = 4;
    while input.len() - offset >= 4 {
        let size = read_u32(input, offset) as usize;
        if size as u32 == LEGACY_MAGIC {
            // Concatenated frames: another magic starts the next one.
            offset += 4;
            continue;
        }
        let available = input.len() - offset - 4;
        if size > available {
            if input.len() - offset == 4 {
                break; // the trailer
            }
            return Err(Lz4Error::TruncatedBlock {
                offset,
                size,
                available,
            });
        }
        let block = &input[offset + 4..offset + 4 + size];
        let block_limit = limit.saturating_sub(output.len()).min(LEGACY_BLOCK_SIZE);
        decode_block(block, &mut output, block_limit).map_err(|reason| match reason {
            BlockError::Corrupt(reason) => Lz4Error::CorruptBlock { offset, reason },
            BlockError::Limit => Lz4Error::TooLarge { limit },
        })?;
        offset += 4 + size;
    }
    Ok(output)
}

enum BlockError {
    Corrupt(&'static str),
    Limit,
}

/// Appends one decoded block to `output`, writing at most `limit` new bytes.
fn decode_block(block: &[u8], output: &mut Vec<u8>, limit: usize) -> Result<(), BlockError> {
    let start = output.len();
    let mut i = 0;
    loop {
        let token = *block.get(i).ok_or(BlockError::Corrupt("missing token"))?;
        i += 1;

        let literals = extend_length(block, &mut i, usize::from(token >> 4))?;
        let end = i
            .checked_add(literals)
            .filter(|&end| end <= block.len())
            .ok_or(BlockError::Corrupt("literals run past the block"))?;
        if output.len() - start + literals > limit {
            return Err(BlockError::Limit);
        }
        output.extend_from_slice(&block[i..end]);
        i = end;
        if i == block.len() {
            return Ok(());
        }

        let distance = block
            .get(i..i + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .ok_or(BlockError::Corrupt("missing match offset"))?;
        i += 2;
        if distance == 0 || distance > output.len() {
            return Err(BlockError::Corrupt("match offset points before the output"));
        }
        let length = extend_length(block, &mut i, usize::from(token & 0xf))? + MIN_MATCH;
        if output.len() - start + length > limit {
            return Err(BlockError::Limit);
        }
        // Byte by byte, because a match may overlap the bytes it produces.
        let from = output.len() - distance;
        for k in 0..length {
            let byte = output[from + k];
            output.push(byte);
        }
    }
}

/// Adds the extra length bytes that follow a nibble of 15.
fn extend_length(block: &[u8], i: &mut usize, nibble: usize) -> Result<usize, BlockError> {
    let mut length = nibble;
    if nibble == 15 {
        loop {
            let byte = *block
                .get(*i)
                .ok_or(BlockError::Corrupt("length bytes run past the block"))?;
            *i += 1;
            length = length
                .checked_add(usize::from(byte))
                .ok_or(BlockError::Corrupt("length overflows"))?;
            if byte != 255 {
                break;
            }
        }
    }
    Ok(length)
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn frame(blocks: &[&[u8]]) -> Vec<u8> {
        let mut out = LEGACY_MAGIC.to_le_bytes().to_vec();
        for block in blocks {
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(block);
        }
        out
    }

    #[test]
    fn literals_only() {
        let block = [0x50, b'h', b'e', b'l', b'l', b'o'];
        assert_eq!(decode_legacy(&frame(&[&block]), 100).unwrap(), b"hello");
    }

    #[test]
    fn overlapping_match() {
        // "ab", then a match of 6 at distance 2, then the literal "!".
        let block = [0x22, b'a', b'b', 2, 0, 0x10, b'!'];
        assert_eq!(decode_legacy(&frame(&[&block]), 100).unwrap(), b"abababab!");
    }

    #[test]
    fn long_lengths() {
        // 15 + 5 = 20 literals of 'x', then a match of 15 + 4 + 1 = 20 at distance 1.
        let mut block = vec![0xff, 5];
        block.extend_from_slice(&[b'x'; 20]);
        block.extend_from_slice(&[1, 0, 1, 0x00]);
        let out = decode_legacy(&frame(&[&block]), 100).unwrap();
        assert_eq!(out, vec![b'x'; 40]);
    }

    #[test]
    fn trailer_is_ignored() {
        let block = [0x10, b'z'];
        let mut stream = frame(&[&block]);
        stream.extend_from_slice(&1u32.to_le_bytes());
        assert_eq!(decode_legacy(&stream, 100).unwrap(), b"z");
    }

    #[test]
    fn corrupt_streams_are_rejected() {
        assert_eq!(decode_legacy(b"abcd", 100), Err(Lz4Error::BadMagic));
        let bad_offset = [0x10, b'a', 9, 0];
        assert!(matches!(
            decode_legacy(&frame(&[&bad_offset]), 100),
            Err(Lz4Error::CorruptBlock { .. })
        ));
        let short_literals = [0x50, b'a'];
        assert!(matches!(
            decode_legacy(&frame(&[&short_literals]), 100),
            Err(Lz4Error::CorruptBlock { .. })
        ));
        let mut truncated = frame(&[&[0x10, b'a']]);
        truncated.extend_from_slice(&100u32.to_le_bytes());
        truncated.extend_from_slice(&[0; 10]);
        assert!(matches!(
            decode_legacy(&truncated, 100),
            Err(Lz4Error::TruncatedBlock { size: 100, .. })
        ));
    }

    #[test]
    fn output_limit_is_enforced() {
        let block = [0x1f, b'a', 1, 0, 255, 255, 255, 0];
        assert_eq!(
            decode_legacy(&frame(&[&block]), 100),
            Err(Lz4Error::TooLarge { limit: 100 })
        );
    }

    #[test]
    fn matches_lz4_tool() {
        // 10 MiB of compressible but irregular data: more than one 8 MiB legacy block.
        let mut data = Vec::with_capacity(10 << 20);
        let mut state = 0x1234_5678u32;
        while data.len() < 10 << 20 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let run = (state >> 24) as usize % 40;
            data.extend(std::iter::repeat_n((state >> 16) as u8, run));
            data.extend_from_slice(&state.to_le_bytes());
        }
        let child = Command::new("lz4")
            .args(["-l", "-c", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "skipping: lz4 is not available ({e}); install it with apt-get install lz4"
                );
                return;
            }
        };
        let mut stdin = child.stdin.take().unwrap();
        let input = data.clone();
        let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(output.status.success());
        assert!(output.stdout.len() < data.len());

        let decoded = decode_legacy(&output.stdout, 64 << 20).unwrap();
        assert_eq!(decoded.len(), data.len());
        assert!(decoded == data, "decoded bytes differ from the input");
    }
}
