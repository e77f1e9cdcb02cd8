//! `monstervm disk`: create, inspect, check, convert, resize and snapshot disk images with
//! qemu-img's argument conventions and exit codes.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::OutputFormat;
use crate::storage::qcow2::{
    CheckReport, CompressionType, CreateOptions, Qcow2, RepairMode, Snapshot,
};
use crate::storage::{
    open_image, probe_format, BlockBackend, ImageFormat, Locking, OpenOptions, RawFile,
};

/// `check` exit status when the image is corrupt (as qemu-img).
pub const EXIT_CHECK_CORRUPT: i32 = 2;
/// `check` exit status when only leaks remain (as qemu-img).
pub const EXIT_CHECK_LEAKS: i32 = 3;
/// `check` exit status for a format without checks (as qemu-img).
pub const EXIT_CHECK_UNSUPPORTED: i32 = 63;

/// Arguments of `monstervm disk`.
#[derive(Args, Debug)]
pub struct DiskArgs {
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Subcommand, Debug)]
enum DiskCommand {
    /// Create an image: create -f FMT [-o OPTS] [-b BACKING [-F FMT]] IMAGE [SIZE].
    Create(CreateArgs),
    /// Show an image's format, sizes, backing file and snapshots.
    Info(InfoArgs),
    /// Check a qcow2 image's refcounts; exit 0 clean, 2 corrupt, 3 leaks.
    Check(CheckArgs),
    /// Copy an image into a new one of any format: convert [-c] -O FMT SRC DST.
    Convert(ConvertArgs),
    /// Resize an image (qcow2 only grows): resize IMAGE [+|-]SIZE.
    Resize(ResizeArgs),
    /// Manage internal snapshots: -c|-a|-d NAME or -l, or create|list|apply|delete.
    Snapshot(SnapshotArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Image format: raw or qcow2.
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    format: String,
    /// Format options, comma-separated: cluster_size, compat, refcount_bits, extended_l2,
    /// compression_type, lazy_refcounts, backing_file, backing_fmt, size.
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Backing file (qcow2 only); relative names are relative to IMAGE's folder.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Suppress messages.
    #[arg(short = 'q')]
    quiet: bool,
    /// Path of the new image.
    image: PathBuf,
    /// Virtual size in bytes, or with a suffix k, M, G, T, P, E (powers of 1024).
    size: Option<String>,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Image format; detected from the file when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Open without a lock, so that an image a running VM or QEMU writes can be read; its
    /// metadata may be half-written (qemu-img's -U).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Set from the global --output option.
    #[arg(skip)]
    output: OutputFormat,
    /// Image to inspect.
    image: PathBuf,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Repair leaks (leaks) or rebuild all refcounts (all).
    #[arg(short = 'r', value_name = "leaks|all")]
    repair: Option<String>,
    /// Image format; detected from the file when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Set from the global --output option.
    #[arg(skip)]
    output: OutputFormat,
    /// Suppress messages.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image to check.
    image: PathBuf,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// Compress the destination clusters (qcow2 only).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress on standard error.
    #[arg(short = 'p')]
    progress: bool,
    /// Source format; detected from the file when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    source_format: Option<String>,
    /// Destination format.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Destination format options, as for create.
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// Suppress messages.
    #[arg(short = 'q')]
    quiet: bool,
    /// Source image.
    source: PathBuf,
    /// Destination image (replaced if it exists).
    destination: PathBuf,
}

#[derive(Args, Debug)]
struct ResizeArgs {
    /// Image format; detected from the file when omitted.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Allow a raw image to shrink.
    #[arg(long)]
    shrink: bool,
    /// Suppress messages.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image to resize.
    image: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

#[derive(Args, Debug)]
struct SnapshotArgs {
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME", group = "action")]
    create: Option<String>,
    /// List snapshots.
    #[arg(short = 'l', group = "action")]
    list: bool,
    /// Revert the disk to snapshot NAME (id or name).
    #[arg(short = 'a', value_name = "NAME", group = "action")]
    apply: Option<String>,
    /// Delete snapshot NAME (id or name).
    #[arg(short = 'd', value_name = "NAME", group = "action")]
    delete: Option<String>,
    /// Set from the global --output option.
    #[arg(skip)]
    output: OutputFormat,
    /// Suppress messages.
    #[arg(short = 'q')]
    quiet: bool,
    /// IMAGE, or `create|apply|delete NAME IMAGE`, or `list IMAGE`.
    #[arg(num_args = 1..=3, required = true)]
    words: Vec<String>,
}

/// Runs a `monstervm disk` command with the global `--output` format and returns the
/// process exit status.
pub fn run(args: DiskArgs, output: OutputFormat) -> anyhow::Result<i32> {
    match args.command {
        DiskCommand::Create(args) => create(args),
        DiskCommand::Info(args) => info(InfoArgs { output, ..args }),
        DiskCommand::Check(args) => check(CheckArgs { output, ..args }),
        DiskCommand::Convert(args) => convert(args),
        DiskCommand::Resize(args) => resize(args),
        DiskCommand::Snapshot(args) => snapshot(SnapshotArgs { output, ..args }),
    }
}

/// Parses a size as qemu-img does: bytes, or a number with a k, M, G, T, P or E suffix
/// (powers of 1024; a trailing `B` or `iB` is accepted).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let trimmed = text.trim();
    let without_b = trimmed
        .strip_suffix("iB")
        .or_else(|| trimmed.strip_suffix('B'))
        .unwrap_or(trimmed);
    let (number, shift) = match without_b.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => bail!("invalid size {text:?}: unknown suffix {c:?}; use k, M, G, T, P or E"),
            };
            (&without_b[..i], shift)
        }
        _ => (without_b, 0),
    };
    let value: f64 = number.parse().with_context(|| {
        format!("invalid size {text:?}: expected a number of bytes with an optional suffix")
    })?;
    let bytes = value * (1u64 << shift) as f64;
    if !(0.0..=(u64::MAX as f64)).contains(&bytes) || bytes.fract() != 0.0 {
        bail!("invalid size {text:?}: must be a whole number of bytes");
    }
    Ok(bytes as u64)
}

/// Formats a byte count as qemu-img does: three significant digits and a binary unit.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 * 0.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let mut text = format!("{value:.digits$}");
    if text.contains('.') {
        text = text.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{text} {}", UNITS[unit])
}

fn parse_format(name: &str) -> anyhow::Result<ImageFormat> {
    Ok(name.parse::<ImageFormat>()?)
}

fn detect_format(path: &Path, requested: Option<&str>) -> anyhow::Result<ImageFormat> {
    match requested {
        Some(name) => parse_format(name),
        None => Ok(probe_format(path)?),
    }
}

fn parse_bool(key: &str, value: &str) -> anyhow::Result<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("invalid value {value:?} for option {key}: use on or off"),
    }
}

/// Applies `-o key=value,...` options to qcow2 creation settings.
fn apply_options(options: &mut CreateOptions, specs: &[String]) -> anyhow::Result<()> {
    for spec in specs {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .with_context(|| format!("invalid option {item:?}: expected KEY=VALUE"))?;
            match key {
                "size" => options.size = parse_size(value)?,
                "cluster_size" => options.cluster_size = parse_size(value)?,
                "compat" => {
                    options.version = match value {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => bail!("invalid compat {value:?}: use 0.10 or 1.1"),
                    }
                }
                "refcount_bits" => options.refcount_bits = value.parse().with_context(|| format!("invalid refcount_bits {value:?}"))?,
                "extended_l2" => options.extended_l2 = parse_bool(key, value)?,
                "lazy_refcounts" => options.lazy_refcounts = parse_bool(key, value)?,
                "compression_type" => {
                    options.compression = match value {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => bail!("invalid compression_type {value:?}: use zlib or zstd"),
                    }
                }
                "backing_file" => options.backing_file = Some(value.to_string()),
                "backing_fmt" => options.backing_format = Some(parse_format(value)?),
                "preallocation" if value == "off" => {}
                _ => bail!("unsupported option {key:?}; supported: size, cluster_size, compat, refcount_bits, extended_l2, lazy_refcounts, compression_type, backing_file, backing_fmt"),
            }
        }
    }
    Ok(())
}

fn create(args: CreateArgs) -> anyhow::Result<i32> {
    let format = parse_format(&args.format)?;
    let mut options = CreateOptions::default();
    apply_options(&mut options, &args.options)?;
    if let Some(size) = &args.size {
        options.size = parse_size(size)?;
    }
    if let Some(backing) = args.backing {
        options.backing_file = Some(backing);
    }
    if let Some(backing_format) = &args.backing_format {
        options.backing_format = Some(parse_format(backing_format)?);
    }
    match format {
        ImageFormat::Raw => {
            if options.backing_file.is_some() {
                bail!("raw images cannot have a backing file; use -f qcow2");
            }
            RawFile::create(&args.image, options.size)?;
        }
        ImageFormat::Qcow2 => {
            if options.backing_file.is_some() && options.backing_format.is_none() {
                bail!("a backing file needs its format: add -F raw or -F qcow2");
            }
            if options.backing_file.is_none() && args.size.is_none() && options.size == 0 {
                bail!("missing image size: give SIZE or -b BACKING");
            }
            Qcow2::create(&args.image, &options)?.close()?;
        }
    }
    if !args.quiet {
        println!(
            "Formatting '{}', fmt={} size={}",
            args.image.display(),
            format,
            options.size
        );
    }
    Ok(0)
}

fn snapshot_json(snapshot: &Snapshot) -> serde_json::Value {
    json!({
        "id": snapshot.id,
        "name": snapshot.name,
        "vm-state-size": snapshot.vm_state_size,
        "date-sec": snapshot.date_sec,
        "date-nsec": snapshot.date_nsec,
        "vm-clock-sec": snapshot.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": snapshot.vm_clock_nsec % 1_000_000_000,
        "icount": snapshot.icount,
    })
}

/// Converts days since 1970-01-01 to a (year, month, day) civil date (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats the snapshot table as `qemu-img snapshot -l` does (dates in UTC).
pub fn snapshot_table(snapshots: &[Snapshot]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snapshots {
        let secs = i64::from(s.date_sec);
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let rem = secs.rem_euclid(86_400);
        let date = format!(
            "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        );
        let ms = s.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        out += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            date,
            clock,
            icount
        );
    }
    out
}

fn disk_usage(path: &Path) -> anyhow::Result<(u64, u64)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok((meta.len(), meta.blocks() * 512))
}

fn info(args: InfoArgs) -> anyhow::Result<i32> {
    let format = detect_format(&args.image, args.format.as_deref())?;
    let (file_len, actual) = disk_usage(&args.image)?;
    let name = args.image.display().to_string();
    match format {
        ImageFormat::Raw => {
            if args.output == OutputFormat::Json {
                let value = json!({
                    "virtual-size": file_len, "filename": name, "format": "raw",
                    "actual-size": actual, "dirty-flag": false,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("image: {name}\nfile format: raw\nvirtual size: {} ({file_len} bytes)\ndisk size: {}", human_size(file_len), human_size(actual));
            }
        }
        ImageFormat::Qcow2 => {
            let options = OpenOptions {
                locking: if args.force_share {
                    Locking::Off
                } else {
                    Locking::On
                },
                ..OpenOptions::read_only()
            };
            let image = Qcow2::open(&args.image, &options)?;
            let info = image.info();
            let compat = if info.version >= 3 { "1.1" } else { "0.10" };
            if args.output == OutputFormat::Json {
                let mut specific = json!({ "compat": compat, "refcount-bits": info.refcount_bits, "corrupt": info.corrupt });
                if info.version >= 3 {
                    specific["compression-type"] = json!(info.compression.name());
                    specific["lazy-refcounts"] = json!(info.lazy_refcounts);
                    specific["extended-l2"] = json!(info.extended_l2);
                }
                let mut value = json!({
                    "virtual-size": info.size, "filename": name, "cluster-size": info.cluster_size,
                    "format": "qcow2", "actual-size": actual, "dirty-flag": info.dirty,
                    "format-specific": { "type": "qcow2", "data": specific },
                });
                if let Some(backing) = &info.backing_file {
                    value["backing-filename"] = json!(backing);
                    let full = crate::storage::resolve_backing_path(&args.image, backing);
                    value["full-backing-filename"] = json!(full.display().to_string());
                }
                if let Some(format) = &info.backing_format {
                    value["backing-filename-format"] = json!(format);
                }
                if !info.snapshots.is_empty() {
                    value["snapshots"] = info.snapshots.iter().map(snapshot_json).collect();
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("image: {name}\nfile format: qcow2");
                println!(
                    "virtual size: {} ({} bytes)",
                    human_size(info.size),
                    info.size
                );
                println!(
                    "disk size: {}\ncluster_size: {}",
                    human_size(actual),
                    info.cluster_size
                );
                if let Some(backing) = &info.backing_file {
                    println!("backing file: {backing}");
                }
                if let Some(format) = &info.backing_format {
                    println!("backing file format: {format}");
                }
                if !info.snapshots.is_empty() {
                    print!("{}", snapshot_table(&info.snapshots));
                }
                println!("Format specific information:\n    compat: {compat}");
                if info.version >= 3 {
                    println!(
                        "    compression type: {}\n    lazy refcounts: {}",
                        info.compression.name(),
                        info.lazy_refcounts
                    );
                }
                println!(
                    "    refcount bits: {}\n    corrupt: {}",
                    info.refcount_bits, info.corrupt
                );
                if info.version >= 3 {
                    println!("    extended l2: {}", info.extended_l2);
                }
            }
        }
    }
    Ok(0)
}

fn print_check(name: &str, report: &CheckReport, output: OutputFormat) -> anyhow::Result<()> {
    let remaining_corruptions = report.corruptions - report.corruptions_fixed;
    let remaining_leaks = report.leaks - report.leaks_fixed;
    if output == OutputFormat::Json {
        let mut value = json!({
            "image-end-offset": report.image_end_offset,
            "total-clusters": report.total_clusters,
            "check-errors": 0,
            "filename": name,
            "format": "qcow2",
        });
        if report.allocated_clusters > 0 {
            value["allocated-clusters"] = json!(report.allocated_clusters);
            value["fragmented-clusters"] = json!(report.fragmented_clusters);
            value["compressed-clusters"] = json!(report.compressed_clusters);
        }
        if remaining_corruptions > 0 {
            value["corruptions"] = json!(remaining_corruptions);
        }
        if remaining_leaks > 0 {
            value["leaks"] = json!(remaining_leaks);
        }
        if report.corruptions_fixed > 0 {
            value["corruptions-fixed"] = json!(report.corruptions_fixed);
        }
        if report.leaks_fixed > 0 {
            value["leaks-fixed"] = json!(report.leaks_fixed);
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    for message in &report.messages {
        println!("{message}");
    }
    if report.leaks_fixed > 0 || report.corruptions_fixed > 0 {
        println!("The following inconsistencies were found and repaired:\n");
        println!(
            "    {} leaked clusters\n    {} corruptions\n",
            report.leaks_fixed, report.corruptions_fixed
        );
        println!("Double checking the fixed image now...");
    }
    if remaining_corruptions == 0 && remaining_leaks == 0 {
        println!("No errors were found on the image.");
    }
    if remaining_corruptions > 0 {
        println!("\n{remaining_corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.");
    }
    if remaining_leaks > 0 {
        println!("\n{remaining_leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.");
    }
    if report.allocated_clusters > 0 && report.total_clusters > 0 {
        let pct = |n: u64, of: u64| {
            if of == 0 {
                0.0
            } else {
                n as f64 * 100.0 / of as f64
            }
        };
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            report.allocated_clusters,
            report.total_clusters,
            pct(report.allocated_clusters, report.total_clusters),
            pct(report.fragmented_clusters, report.allocated_clusters),
            pct(report.compressed_clusters, report.allocated_clusters)
        );
    }
    println!("Image end offset: {}", report.image_end_offset);
    Ok(())
}

fn check(args: CheckArgs) -> anyhow::Result<i32> {
    let format = detect_format(&args.image, args.format.as_deref())?;
    if format != ImageFormat::Qcow2 {
        report!("monstervm: this image format ({format}) does not support checks");
        return Ok(EXIT_CHECK_UNSUPPORTED);
    }
    let mode = match args.repair.as_deref() {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(other) => bail!("invalid repair mode {other:?}: use leaks or all"),
    };
    let options = OpenOptions {
        read_only: mode == RepairMode::None,
        ..OpenOptions::default()
    };
    let image = Qcow2::open(&args.image, &options)?;
    let mut report = image.check(mode)?;
    if mode != RepairMode::None && (report.leaks_fixed > 0 || report.corruptions_fixed > 0) {
        let again = image.check(RepairMode::None)?;
        report.messages.clear();
        report.corruptions = again.corruptions + report.corruptions_fixed;
        report.leaks = again.leaks + report.leaks_fixed;
        report.image_end_offset = again.image_end_offset;
    }
    image.close()?;
    if !args.quiet {
        print_check(&args.image.display().to_string(), &report, args.output)?;
    }
    let code = if report.corruptions > report.corruptions_fixed {
        EXIT_CHECK_CORRUPT
    } else if report.leaks > report.leaks_fixed {
        EXIT_CHECK_LEAKS
    } else {
        0
    };
    Ok(code)
}

/// Returns whether every byte is zero.
fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

/// The image `convert` writes.
enum Destination {
    Raw(RawFile),
    Qcow2(Box<Qcow2>),
}

fn convert(args: ConvertArgs) -> anyhow::Result<i32> {
    let source_format = detect_format(&args.source, args.source_format.as_deref())?;
    let output_format = parse_format(&args.output_format)?;
    let source = open_image(
        &args.source,
        &OpenOptions {
            read_only: true,
            format: Some(source_format),
            ..OpenOptions::default()
        },
    )?;
    let size = source.size();
    let mut options = CreateOptions::default();
    apply_options(&mut options, &args.options)?;
    options.size = size;
    if args.compress && output_format != ImageFormat::Qcow2 {
        bail!("compression (-c) needs -O qcow2");
    }

    let destination = match output_format {
        ImageFormat::Raw => Destination::Raw(RawFile::create(&args.destination, size)?),
        ImageFormat::Qcow2 => {
            Destination::Qcow2(Box::new(Qcow2::create(&args.destination, &options)?))
        }
    };
    // Chunks are whole destination clusters so compressed writes stay cluster-aligned.
    let cluster = options.cluster_size;
    let chunk = (1u64 << 20).max(cluster);
    let mut buf = vec![0u8; chunk as usize];
    let mut offset = 0u64;
    let mut last_percent = -1i64;
    while offset < size {
        let len = chunk.min(size - offset) as usize;
        source.read_at(&mut buf[..len], offset)?;
        let mut at = 0usize;
        while at < len {
            let piece = (cluster as usize).min(len - at);
            let data = &buf[at..at + piece];
            let guest = offset + at as u64;
            if !is_zero(data) {
                match &destination {
                    Destination::Qcow2(image) if args.compress => {
                        image.write_compressed(data, guest)?
                    }
                    Destination::Qcow2(image) => image.write_at(data, guest)?,
                    Destination::Raw(raw) => raw.write_at(data, guest)?,
                }
            }
            at += piece;
        }
        offset += len as u64;
        if args.progress {
            let percent = (offset * 10_000 / size.max(1)) as i64;
            if percent != last_percent {
                report_inline!("    ({:.2}/100%)\r", percent as f64 / 100.0);
                let _ = std::io::stderr().flush();
                last_percent = percent;
            }
        }
    }
    if args.progress {
        report!("");
    }
    match destination {
        Destination::Raw(raw) => raw.flush()?,
        Destination::Qcow2(image) => image.close()?,
    }
    Ok(0)
}

fn resize(args: ResizeArgs) -> anyhow::Result<i32> {
    let format = detect_format(&args.image, args.format.as_deref())?;
    let options = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let current = open_image(
        &args.image,
        &OpenOptions {
            read_only: true,
            ..options.clone()
        },
    )?
    .size();
    let new_size = if let Some(delta) = args.size.strip_prefix('+') {
        current
            .checked_add(parse_size(delta)?)
            .context("new size overflows")?
    } else if let Some(delta) = args.size.strip_prefix('-') {
        current
            .checked_sub(parse_size(delta)?)
            .context("new size would be negative")?
    } else {
        parse_size(&args.size)?
    };
    match format {
        ImageFormat::Raw => {
            if new_size < current && !args.shrink {
                bail!("shrinking from {current} to {new_size} bytes may lose data; add --shrink");
            }
            RawFile::open(&args.image, &OpenOptions::default())?.resize(new_size)?;
        }
        ImageFormat::Qcow2 => {
            let image = Qcow2::open(&args.image, &options)?;
            image.resize(new_size)?;
            image.close()?;
        }
    }
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

enum SnapshotAction {
    Create(String),
    List,
    Apply(String),
    Delete(String),
}

fn snapshot(args: SnapshotArgs) -> anyhow::Result<i32> {
    let mut words = args.words;
    let image_path = PathBuf::from(words.pop().context("missing IMAGE")?);
    let flag_action = if let Some(name) = args.create {
        Some(SnapshotAction::Create(name))
    } else if let Some(name) = args.apply {
        Some(SnapshotAction::Apply(name))
    } else if let Some(name) = args.delete {
        Some(SnapshotAction::Delete(name))
    } else if args.list {
        Some(SnapshotAction::List)
    } else {
        None
    };
    let action = match (flag_action, words.as_slice()) {
        (Some(action), []) => action,
        (None, [verb]) if verb == "list" => SnapshotAction::List,
        (None, []) => SnapshotAction::List,
        (None, [verb, name]) => match verb.as_str() {
            "create" => SnapshotAction::Create(name.clone()),
            "apply" => SnapshotAction::Apply(name.clone()),
            "delete" => SnapshotAction::Delete(name.clone()),
            other => bail!("unknown snapshot action {other:?}: use create, list, apply or delete"),
        },
        _ => bail!("usage: snapshot -c|-a|-d NAME IMAGE, snapshot -l IMAGE, or snapshot create|apply|delete NAME IMAGE"),
    };
    if probe_format(&image_path)? != ImageFormat::Qcow2 {
        bail!(
            "{} is not a qcow2 image; only qcow2 has internal snapshots",
            image_path.display()
        );
    }
    let read_only = matches!(action, SnapshotAction::List);
    let image = Qcow2::open(
        &image_path,
        &OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )?;
    match action {
        SnapshotAction::Create(name) => {
            image.create_snapshot(&name)?;
        }
        SnapshotAction::Apply(name) => image.apply_snapshot(&name)?,
        SnapshotAction::Delete(name) => image.delete_snapshot(&name)?,
        SnapshotAction::List => {
            let snapshots = image.snapshots();
            if args.output == OutputFormat::Json {
                let list: Vec<_> = snapshots.iter().map(snapshot_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if !snapshots.is_empty() && !args.quiet {
                print!("{}", snapshot_table(&snapshots));
            }
        }
    }
    image.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("1x").is_err());
        assert!(parse_size("abc").is_err());
    }

    #[test]
    fn human_size_matches_qemu_img() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(217_088), "212 KiB");
        assert_eq!(human_size(459_264), "448 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn civil_date_of_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
    }
}
