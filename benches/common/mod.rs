//! Helpers shared by the benchmarks.

/// Returns the RSS of process `pid` minus that of its guest RAM: the largest-RSS mapping
/// at least `guest_kib` in size.
pub fn vmm_rss_kib(pid: u32, guest_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0;
    let mut guest_rss = 0;
    let mut mapping_kib = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                {
                    mapping_kib = (end - start) >> 10;
                    continue;
                }
            }
        }
        if let Some(value) = line.strip_prefix("Rss:") {
            let kib: u64 = value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if mapping_kib >= guest_kib && kib > guest_rss {
                guest_rss = kib;
            }
        }
    }
    total - guest_rss
}

/// Returns the median of `values`, sorting them in place.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
