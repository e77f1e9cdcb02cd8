//! The embedded default guest that `monstervm run` boots when no kernel is given.
//!
//! `src/core/asm/boot.asm` is a flat binary that build.rs assembles with NASM. It is
//! loaded at [`LOAD_ADDRESS`] and entered in real mode at CS:IP 0000:8000. It switches
//! to protected mode and then to long mode with its own GDT and page tables. There it
//! prints a banner and timer readings on COM1 and echoes serial input until it reads
//! `q`. Then it powers off through the ACPI PM1a control port [`PM1A_CNT_PORT`].

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::hypervisor::{CpuState, DescriptorTable, Segment};

/// The assembled guest.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/boot.bin"));

/// Guest-physical address of the image's first byte; the source's `org` matches it.
pub const LOAD_ADDRESS: u64 = 0x8000;
/// Highest guest-physical address (exclusive) that the guest touches outside its
/// image, so RAM must reach at least this far: 64 KiB.
pub const MEMORY_NEEDED: u64 = 0x1_0000;
/// The ACPI PM1a control port that the guest writes `PM1A_SLEEP_S5` to, as a 16-bit
/// write, when it powers off.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// The value written to [`PM1A_CNT_PORT`]: SLP_TYP 5 (bits 10-12) with SLP_EN (bit 13).
pub const PM1A_SLEEP_S5: u16 = (5 << 10) | (1 << 13);
/// The guest's serial port (COM1, a 16550 at this base, polled).
pub const SERIAL_PORT: u16 = 0x3f8;

/// Errors raised while loading the embedded guest.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "the embedded guest needs guest RAM from 0x0 to {end:#x}, which this VM lacks: \
         give it at least {MEMORY_NEEDED:#x} bytes of RAM from address 0"
    )]
    MemoryTooSmall { end: u64 },
    #[error("failed to write the embedded guest at {LOAD_ADDRESS:#x}: {source}")]
    Write {
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes the embedded guest into `memory` and returns the real-mode state that enters it.
///
/// The returned state has CS:IP 0000:8000, 64 KiB real-mode segments based at 0,
/// interrupts disabled and paging off; registers it does not name are zero.
pub fn load(memory: &GuestMemoryMmap) -> Result<CpuState, EmbeddedError> {
    let image_end = LOAD_ADDRESS + IMAGE.len() as u64;
    let needed_end = image_end.max(MEMORY_NEEDED);
    if !memory.check_range(GuestAddress(0), needed_end as usize) {
        return Err(EmbeddedError::MemoryTooSmall { end: needed_end });
    }

    memory
        .write_slice(IMAGE, GuestAddress(LOAD_ADDRESS))
        .map_err(|source| EmbeddedError::Write { source })?;

    Ok(real_mode_state(0, LOAD_ADDRESS as u16))
}

/// Returns a real-mode state entering at `cs:ip`, with every data segment at base 0.
pub fn real_mode_state(cs: u16, ip: u16) -> CpuState {
    let data = real_mode_segment(0, 0x3);
    CpuState {
        rip: u64::from(ip),
        // Bit 1 of RFLAGS is reserved and always set.
        rflags: 0x2,
        cs: real_mode_segment(cs, 0xb),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            limit: 0xffff,
            // A busy 32-bit TSS, as after reset: VMX entry checks reject an available one.
            type_: 0xb,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            limit: 0xffff,
            type_: 0x2,
            present: true,
            ..Segment::default()
        },
        gdt: DescriptorTable {
            base: 0,
            limit: 0xffff,
        },
        idt: DescriptorTable {
            base: 0,
            limit: 0x3ff,
        },
        // ET reads as 1 on every CPU since the Pentium.
        cr0: 0x10,
        ..CpuState::default()
    }
}

/// Returns a real-mode segment for `selector` with descriptor type `type_`.
fn real_mode_segment(selector: u16, type_: u8) -> Segment {
    Segment {
        selector,
        base: u64::from(selector) << 4,
        limit: 0xffff,
        type_,
        present: true,
        s: true,
        ..Segment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::memory::create_guest_memory;

    #[test]
    fn load_writes_image_and_entry_state() {
        let memory = create_guest_memory(2).unwrap();

        let state = load(&memory).unwrap();

        let mut loaded = vec![0u8; IMAGE.len()];
        memory
            .read_slice(&mut loaded, GuestAddress(LOAD_ADDRESS))
            .unwrap();
        assert_eq!(loaded, IMAGE);
        assert_eq!(state.cs.selector, 0);
        assert_eq!(state.cs.base, 0);
        assert_eq!(state.rip, LOAD_ADDRESS);
        assert_eq!(state.cr0 & 1, 0, "the guest must start in real mode");
        assert_eq!(state.rflags & (1 << 9), 0, "interrupts must start disabled");
    }

    #[test]
    fn load_rejects_memory_below_needed() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();

        let error = load(&memory).unwrap_err();

        assert!(
            matches!(error, EmbeddedError::MemoryTooSmall { end } if end == MEMORY_NEEDED),
            "{error}"
        );
    }

    #[test]
    fn image_fits_below_memory_needed() {
        assert!(LOAD_ADDRESS + (IMAGE.len() as u64) <= MEMORY_NEEDED);
    }

    #[test]
    fn power_off_value_matches_source() {
        let source = include_str!("../asm/boot.asm");
        assert!(source.contains(&format!("%define PM1A_CNT_PORT   {PM1A_CNT_PORT:#x}")));
        assert_eq!(PM1A_SLEEP_S5, 0x3400);
    }

    /// Assembles boot.asm and compares it with the committed image, which builds use
    /// where NASM is missing. Skips where NASM is missing here too.
    #[test]
    fn committed_image_matches_source() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("boot.bin");
        let manifest = env!("CARGO_MANIFEST_DIR");
        let status = std::process::Command::new("nasm")
            .args(["-f", "bin", "-o"])
            .arg(&output)
            .arg(format!("{manifest}/src/core/asm/boot.asm"))
            .status();
        let status = match status {
            Ok(status) => status,
            Err(error) => {
                eprintln!("skipping: nasm could not run ({error})");
                return;
            }
        };
        assert!(status.success(), "nasm failed on boot.asm: {status}");

        let assembled = std::fs::read(&output).unwrap();
        let committed = std::fs::read(format!("{manifest}/src/core/asm/boot.bin")).unwrap();
        assert!(
            assembled == committed,
            "src/core/asm/boot.bin is stale: copy the output of \
             `nasm -f bin -o src/core/asm/boot.bin src/core/asm/boot.asm` over it"
        );
        assert_eq!(IMAGE, committed.as_slice());
    }
}
