//! Compressed clusters: raw deflate with a 4 KiB window (what QEMU reads) and zstd.

use super::header::CompressionType;

/// Deflate window of qcow2 clusters: QEMU 10 (block/qcow2-threads.c) inflates them with
/// zlib `windowBits` -12, so a larger window would make clusters it cannot read.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// Decompresses `input` into exactly `out.len()` bytes; returns a reason on failure.
///
/// Bytes after the end of the compressed stream are ignored, because a compressed
/// cluster is padded to 512-byte sectors and may share its last sector with the next one.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => {
            let mut inflater = flate2::Decompress::new(false);
            match inflater.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if inflater.total_out() == out.len() as u64 => Ok(()),
                Ok(status) => Err(format!(
                    "deflate stream produced {} of {} bytes ({status:?})",
                    inflater.total_out(),
                    out.len()
                )),
                Err(e) => Err(format!("deflate stream is invalid: {e}")),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut decoder =
                Decoder::new().map_err(|e| format!("zstd decoder setup failed: {e}"))?;
            let mut src = InBuffer::around(input);
            let mut dst = OutBuffer::around(out);
            while dst.pos() < dst.capacity() && src.pos() < input.len() {
                let before = (src.pos(), dst.pos());
                let hint = decoder
                    .run(&mut src, &mut dst)
                    .map_err(|e| format!("zstd frame is invalid: {e}"))?;
                if hint == 0 || before == (src.pos(), dst.pos()) {
                    break;
                }
            }
            if dst.pos() == dst.capacity() {
                Ok(())
            } else {
                Err(format!(
                    "zstd frame produced {} of {} bytes",
                    dst.pos(),
                    dst.capacity()
                ))
            }
        }
    }
}

/// Compresses one cluster; returns `None` when the result would not be smaller than
/// `max_len` bytes.
pub fn compress(kind: CompressionType, input: &[u8], max_len: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            let mut deflater = flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                DEFLATE_WINDOW_BITS,
            );
            let mut out = vec![0u8; max_len];
            match deflater.compress(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => {
                    out.truncate(deflater.total_out() as usize);
                    Some(out)
                }
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, zstd::DEFAULT_COMPRESSION_LEVEL).ok()?;
            (out.len() < max_len).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_methods() {
        let mut cluster = vec![0u8; 65536];
        for (i, byte) in cluster.iter_mut().enumerate() {
            *byte = (i / 300) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut packed = compress(kind, &cluster, cluster.len()).expect("compressible");
            packed.extend_from_slice(&[0xee; 300]); // sector padding and a neighbour's bytes
            let mut out = vec![0u8; cluster.len()];
            decompress(kind, &packed, &mut out).unwrap();
            assert_eq!(out, cluster, "{kind:?}");
        }
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let cluster = vec![7u8; 4096];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let packed = compress(kind, &cluster, cluster.len()).unwrap();
            let mut out = vec![0u8; 8192];
            assert!(decompress(kind, &packed, &mut out).is_err(), "{kind:?}");
        }
    }
}
