//! Boots a Linux bzImage on the emulator CPU with a minimal UART, PIC and timer, and
//! prints what the kernel writes to the serial port. This manual smoke test for the CPU
//! core finds missing instructions and mode bugs before the emulator backend exists.
//!
//! Run with `MONSTERVM_SMOKE_KERNEL=/path/to/vmlinuz cargo test --release --test
//! emu_linux_smoke -- --ignored --nocapture`. `MONSTERVM_SMOKE_INSTRUCTIONS` caps the
//! instructions run (default 2e9). `MONSTERVM_SMOKE_SECONDS` ends the run once the guest
//! idles in HLT after that many seconds of wall time (default 300).
//! `MONSTERVM_SMOKE_INITRD` names an initramfs (for example a static BusyBox with an
//! `/init` script) to load at the top of RAM.

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

/// Vector base that the kernel programs into the master 8259 when none is set yet.
const DEFAULT_VECTOR_BASE: u8 = 0x30;
/// Wall-clock nanoseconds between two timer interrupts (IRQ 0).
const TIMER_PERIOD_NS: u64 = 1_000_000;

/// A machine with RAM, a 16550 UART at 0x3f8 on IRQ 4, a master 8259 PIC and a timer
/// that raises IRQ 0 every millisecond. Just enough of each for Linux's drivers.
struct SmokeBus {
    memory: GuestMemoryMmap,
    started: Instant,
    output: Vec<u8>,
    /// PIC: interrupt mask register, vector base (ICW2) and initialization step.
    pic_mask: u8,
    pic_base: u8,
    pic_init_step: u8,
    /// Pending edge-triggered timer interrupt and when the next one is due.
    timer_pending: bool,
    next_tick_ns: u64,
    /// Interrupt checks since the last clock read; the clock is read every 4096.
    checks: std::cell::Cell<u32>,
    /// UART registers: interrupt enable, line control, modem control, scratch.
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    /// The UART's "transmitter empty" interrupt is raised until IIR reports it.
    thre_pending: bool,
}

impl SmokeBus {
    fn new(memory: GuestMemoryMmap) -> Self {
        SmokeBus {
            memory,
            started: Instant::now(),
            output: Vec::new(),
            pic_mask: 0xff,
            pic_base: DEFAULT_VECTOR_BASE,
            pic_init_step: 0,
            timer_pending: false,
            next_tick_ns: TIMER_PERIOD_NS,
            checks: std::cell::Cell::new(0),
            ier: 0,
            lcr: 0,
            mcr: 0,
            scratch: 0,
            thre_pending: false,
        }
    }

    /// Returns the pending, unmasked IRQ of highest priority.
    fn pending_irq(&self) -> Option<u8> {
        let serial = self.ier & 0x02 != 0 && self.thre_pending;
        [(0, self.timer_pending), (4, serial)]
            .into_iter()
            .find(|&(irq, pending)| pending && self.pic_mask & (1 << irq) == 0)
            .map(|(irq, _)| irq)
    }

    fn modem_status(&self) -> u8 {
        if self.mcr & 0x10 == 0 {
            return 0xb0; // CTS, DSR and DCD
        }
        // Loopback: RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD.
        ((self.mcr & 0x02) << 3) | ((self.mcr & 0x01) << 5) | ((self.mcr & 0x0c) << 4)
    }
}

impl CpuBus for SmokeBus {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let dlab = self.lcr & 0x80 != 0;
        let value = match port {
            0x21 => self.pic_mask,
            0x20 => 0,
            0x3f8 if !dlab => 0,
            0x3f9 if !dlab => self.ier,
            0x3fa => {
                if self.ier & 0x02 != 0 && self.thre_pending {
                    self.thre_pending = false;
                    0x02
                } else {
                    0x01
                }
            }
            0x3fb => self.lcr,
            0x3fc => self.mcr,
            0x3fd => 0x60,
            0x3fe => self.modem_status(),
            0x3ff => self.scratch,
            _ => 0xff,
        };
        data.fill(0);
        data[0] = value;
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let value = data[0];
        let dlab = self.lcr & 0x80 != 0;
        match port {
            0x20 if value & 0x10 != 0 => self.pic_init_step = 1,
            0x21 => match self.pic_init_step {
                1 => {
                    self.pic_base = value & 0xf8;
                    self.pic_init_step = 2;
                }
                2 => self.pic_init_step = 3,
                3 => self.pic_init_step = 0,
                _ => self.pic_mask = value,
            },
            0x3f8 if !dlab => {
                if self.mcr & 0x10 == 0 {
                    self.output.push(value);
                    let mut stdout = std::io::stdout();
                    let _ = stdout.write_all(&[value]);
                    let _ = stdout.flush();
                }
                self.thre_pending = true;
            }
            0x3f9 if !dlab => {
                self.ier = value & 0x0f;
                self.thre_pending = true;
            }
            0x3fb => self.lcr = value,
            0x3fc => self.mcr = value & 0x1f,
            0x3ff => self.scratch = value,
            _ => {}
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
        let checks = self.checks.get().wrapping_add(1);
        self.checks.set(checks);
        if checks % 4096 == 0 && self.started.elapsed().as_nanos() as u64 >= self.next_tick_ns {
            return true;
        }
        self.pending_irq().is_some()
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        let now = self.started.elapsed().as_nanos() as u64;
        if now >= self.next_tick_ns {
            self.timer_pending = true;
            self.next_tick_ns = now + TIMER_PERIOD_NS;
        }
        let irq = self.pending_irq()?;
        if irq == 0 {
            self.timer_pending = false;
        }
        Some(self.pic_base + irq)
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
fn load(memory: &GuestMemoryMmap, image: &[u8], initrd: Option<&[u8]>) -> CpuState {
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
    if let Some(initrd) = initrd {
        // At the top of RAM, clear of the area where the decompressor relocates itself.
        let address = (RAM - initrd.len() as u64) & !0xf_ffff;
        memory.write_slice(initrd, GuestAddress(address)).unwrap();
        memory
            .write_obj(address as u32, GuestAddress(ZERO_PAGE + 0x218))
            .unwrap();
        memory
            .write_obj(initrd.len() as u32, GuestAddress(ZERO_PAGE + 0x21c))
            .unwrap();
    }

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
    let max_seconds: u64 = std::env::var("MONSTERVM_SMOKE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let image = std::fs::read(&path).expect("read the kernel image");
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let initrd = std::env::var("MONSTERVM_SMOKE_INITRD")
        .ok()
        .map(|path| std::fs::read(path).expect("read the initramfs"));
    let state = load(&memory, &image, initrd.as_deref());
    let watch = Arc::new(CodeWatch::new(&memory));
    let mut cpu = Cpu::new(
        CpuConfig {
            apic: false,
            ..CpuConfig::default()
        },
        watch,
    );
    cpu.set_state(&state);
    let mut bus = SmokeBus::new(memory);

    let started = Instant::now();
    let outcome = loop {
        match cpu.run(&mut bus, 10_000_000) {
            Ok(CpuEvent::BudgetExhausted) if cpu.instructions() < limit => continue,
            // HLT with interrupts enabled: idle until the next timer tick is due.
            Ok(CpuEvent::Halted)
                if cpu.rflags() & 0x200 != 0
                    && cpu.instructions() < limit
                    && started.elapsed().as_secs() < max_seconds =>
            {
                std::thread::sleep(std::time::Duration::from_micros(100));
                bus.checks.set(4095);
                continue;
            }
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
