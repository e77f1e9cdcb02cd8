//! Boots a Linux bzImage on the emulator CPU alone, with only a serial port, and prints
//! what the kernel writes to it. A manual smoke test for the CPU core: it finds missing
//! instructions and mode bugs before the full emulator backend exists.
//!
//! Run with `MONSTERVM_SMOKE_KERNEL=/path/to/vmlinuz cargo test --release --test
//! emu_linux_smoke -- --ignored --nocapture`. `MONSTERVM_SMOKE_INSTRUCTIONS` caps the
//! instructions run (default 2e9). Without a timer or interrupt controller the kernel
//! stops making progress once it waits for timer interrupts.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use monstervm::core::cpu::{CodeWatch, Cpu, CpuBus, CpuConfig, CpuEvent};
use monstervm::hypervisor::{CpuState, DescriptorTable, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: u64 = 256 << 20;
const ZERO_PAGE: u64 = 0x7000;
const COMMAND_LINE: u64 = 0x20000;
const PML4: u64 = 0x9000;
const GDT: u64 = 0x500;
const KERNEL: u64 = 0x100000;
const COMMAND: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr noapic nolapic \
                       tsc=reliable lpj=1000000 cryptomgr.notests panic=-1 reboot=k";

/// A machine with RAM and a write-only 16550 transmitter at 0x3f8.
struct SerialBus {
    memory: GuestMemoryMmap,
    started: Instant,
    output: Vec<u8>,
}

impl CpuBus for SerialBus {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        // Line status: transmitter empty; everything else reads as all ones.
        let value = if port == 0x3fd { 0x60 } else { 0xff };
        data.fill(value);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == 0x3f8 {
            self.output.push(data[0]);
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(&data[..1]);
            let _ = stdout.flush();
        }
    }
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {}
    fn tsc(&mut self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        None
    }
}

fn flat(selector: u16, code: bool) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: !code,
        l: code,
        g: true,
        s: true,
        unusable: false,
    }
}

/// Loads a bzImage for the 64-bit boot protocol and returns the entry state.
fn load(memory: &GuestMemoryMmap, image: &[u8]) -> CpuState {
    let setup_sectors = match image[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let kernel_offset = ((setup_sectors + 1) * 512) as usize;
    memory
        .write_slice(&image[kernel_offset..], GuestAddress(KERNEL))
        .unwrap();

    let header_end = 0x202 + image[0x201] as usize;
    memory
        .write_slice(&[0u8; 4096], GuestAddress(ZERO_PAGE))
        .unwrap();
    memory
        .write_slice(&image[0x1f1..header_end], GuestAddress(ZERO_PAGE + 0x1f1))
        .unwrap();
    memory
        .write_obj(0xffu8, GuestAddress(ZERO_PAGE + 0x210))
        .unwrap(); // type_of_loader
    let loadflags: u8 = memory.read_obj(GuestAddress(ZERO_PAGE + 0x211)).unwrap();
    memory
        .write_obj(loadflags | 1, GuestAddress(ZERO_PAGE + 0x211))
        .unwrap();
    memory
        .write_obj(COMMAND_LINE as u32, GuestAddress(ZERO_PAGE + 0x228))
        .unwrap();
    let mut command = COMMAND.as_bytes().to_vec();
    command.push(0);
    memory
        .write_slice(&command, GuestAddress(COMMAND_LINE))
        .unwrap();
    // e820: low RAM below the EBDA, and RAM from 1 MiB.
    for (i, (addr, size)) in [(0u64, 0x9fc00u64), (0x100000, RAM - 0x100000)]
        .into_iter()
        .enumerate()
    {
        let entry = ZERO_PAGE + 0x2d0 + i as u64 * 20;
        memory.write_obj(addr, GuestAddress(entry)).unwrap();
        memory.write_obj(size, GuestAddress(entry + 8)).unwrap();
        memory.write_obj(1u32, GuestAddress(entry + 16)).unwrap();
    }
    memory
        .write_obj(2u8, GuestAddress(ZERO_PAGE + 0x1e8))
        .unwrap();

    // Identity map of 4 GiB with 2 MiB pages: PML4, one PDPT, four PDs.
    memory
        .write_obj(PML4 + 0x1000 + 3, GuestAddress(PML4))
        .unwrap();
    for pd in 0..4u64 {
        let table = PML4 + 0x2000 + pd * 0x1000;
        memory
            .write_obj(table | 3, GuestAddress(PML4 + 0x1000 + pd * 8))
            .unwrap();
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            memory
                .write_obj(phys | 0x83, GuestAddress(table + i * 8))
                .unwrap();
        }
    }
    for (i, entry) in [0u64, 0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff]
        .iter()
        .enumerate()
    {
        memory
            .write_obj(*entry, GuestAddress(GDT + i as u64 * 8))
            .unwrap();
    }

    let mut gprs = [0u64; 16];
    gprs[6] = ZERO_PAGE; // RSI: the zero page
    gprs[4] = 0x8ff0; // RSP
    let data = flat(0x18, false);
    let mut state = CpuState {
        gprs,
        rip: KERNEL + 0x200,
        rflags: 2,
        cs: flat(0x10, true),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        tr: Segment {
            type_: 11,
            present: true,
            limit: 0x67,
            ..Segment::default()
        },
        ldt: Segment {
            unusable: true,
            ..Segment::default()
        },
        gdt: DescriptorTable {
            base: GDT,
            limit: 31,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        // PG, NE, ET, PE; PAE; LMA and LME.
        cr0: 0x8000_0031,
        cr3: PML4,
        cr4: 0x20,
        efer: 0x500,
        mxcsr: 0x1f80,
        ..CpuState::default()
    };
    state.fpu.fcw = 0x37f;
    state
}

#[test]
#[ignore = "needs a kernel image: set MONSTERVM_SMOKE_KERNEL"]
fn boot_linux_to_first_timer_wait() {
    let Ok(path) = std::env::var("MONSTERVM_SMOKE_KERNEL") else {
        println!("skipped: MONSTERVM_SMOKE_KERNEL is not set");
        return;
    };
    let limit: u64 = std::env::var("MONSTERVM_SMOKE_INSTRUCTIONS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(2_000_000_000, |v| v as u64);
    let image = std::fs::read(&path).expect("read the kernel image");
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let state = load(&memory, &image);
    let watch = Arc::new(CodeWatch::new(&memory));
    let mut cpu = Cpu::new(
        CpuConfig {
            apic: false,
            ..CpuConfig::default()
        },
        watch,
    );
    cpu.set_state(&state);
    let mut bus = SerialBus {
        memory,
        started: Instant::now(),
        output: Vec::new(),
    };

    let started = Instant::now();
    let outcome = loop {
        match cpu.run(&mut bus, 10_000_000) {
            Ok(CpuEvent::BudgetExhausted) if cpu.instructions() < limit => continue,
            other => break other,
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "\n--- {outcome:?} after {} instructions in {seconds:.1} s ({:.1} MIPS, {} decodes)\n{}",
        cpu.instructions(),
        cpu.instructions() as f64 / seconds / 1e6,
        cpu.decode_cache_misses(),
        cpu.state()
    );
    assert!(
        outcome.is_ok(),
        "the emulator stopped on an unsupported feature"
    );
    assert!(
        !bus.output.is_empty(),
        "the kernel printed nothing on the serial port"
    );
}
