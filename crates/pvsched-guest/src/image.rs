//! The guest image: x86_64 assembly assembled by rustc into the host binary and copied into
//! guest RAM by the VMM.
//!
//! Why assembly: on hosts where KVM runs guest CPL0 code through its instruction emulator
//! (PVM-flavoured nested KVM, see `docs/testbed.md`), compiler output is unsafe: rustc emits
//! SSE moves between general and vector registers, `popcnt` and similar instructions the
//! emulator does not implement. The code below uses only integer moves and arithmetic,
//! `rdtsc`, `rdmsr`/`wrmsr`, `in`/`out`, `hlt`, `sti`/`cli`, `call`/`ret`, `push`/`pop` and
//! `iretq`: all of them emulated. It is position independent (relative branches only) and
//! addresses its data through `%rbx`, which holds the vCPU's mailbox base for the whole run.
//!
//! Register conventions: interrupts are enabled only at *preemption points* (`sti; out; cli`
//! in the busy and work loops, `sti; hlt; cli` when idle). The timer handler clobbers
//! `%rax`, `%rcx` and `%rdx`, which are therefore dead at every preemption point.

use crate::mailbox::{self, Mailbox};
use core::arch::global_asm;
use core::mem::offset_of;

/// Port the guest writes to leave to the VMM for a moment: keeps a busy vCPU interruptible
/// (a pending interrupt is injected on re-entry). The VMM just resumes the vCPU.
pub const PORT_YIELD: u16 = 0x81;
/// Port the guest writes once it stopped cleanly after `stop` was set.
pub const PORT_DONE: u16 = 0x82;
/// Port the exception stubs write; the byte written is the exception vector and the stack
/// holds `[vector, error code, rip, cs, rflags]`.
pub const PORT_FAULT: u16 = 0x83;
/// Port the guest writes to mark a point in its code; the VMM records the vCPU's KVM exit
/// count there (tests count exits between two marks).
pub const PORT_MARK: u16 = 0x84;
/// Vector of the x2APIC timer interrupt (TSC-deadline mode).
pub const TIMER_VECTOR: u8 = 0x40;
/// Vector of external events the VMM injects (irqfd, MSI): counted and timestamped.
pub const EVENT_VECTOR: u8 = 0x50;
/// Number of iterations per work-loop calibration run.
pub const CALIBRATION_ITERS: u64 = 16;
/// Number of calibration runs; the fastest one counts.
pub const CALIBRATION_RUNS: u64 = 8;
/// Size of one exception stub; stub `n` is at `stubs + n * EXCEPTION_STUB_SIZE`.
pub const EXCEPTION_STUB_SIZE: u64 = 16;

global_asm!(
    r#"
    .pushsection .text.pvsched_guest, "ax"
    .balign 4096
    .globl pvsched_guest_start
pvsched_guest_start:

/* ---- exception stubs: 256 x 16 bytes; push a dummy error code where the CPU pushes none */
    .globl pvsched_guest_stubs
pvsched_guest_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp 900f
    .set vec, vec + 1
    .endr
900:
    movq (%rsp), %rax
    outb %al, ${port_fault}
901:
    cli
    hlt
    jmp 901b

/* ---- timer handler: timestamp first, then count, EOI, return */
    .balign 16
    .globl pvsched_guest_timer
pvsched_guest_timer:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, {fired}(%rbx)
    incq {irqs}(%rbx)
    movl $0x80b, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    iretq

/* ---- external-event handler: timestamp first, then count, EOI, return */
    .balign 16
    .globl pvsched_guest_event
pvsched_guest_event:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, {event_tsc}(%rbx)
    incq {event_irqs}(%rbx)
    movl $0x80b, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    iretq

/* ---- entry: %rbx = mailbox, %rsp = stack top, IF = 0 */
    .balign 16
    .globl pvsched_guest_entry
pvsched_guest_entry:
    movq {flags}(%rbx), %rax
    shrq ${fault_shift}, %rax
    andl $0xff, %eax
    cmpl $1, %eax
    je 800f
    cmpl $2, %eax
    je 801f
    cmpl $3, %eax
    je 802f
    cmpl $4, %eax
    je 803f

    /* x2APIC: enable, software-enable with spurious vector 0xff, timer in TSC-deadline mode */
    movl $0x1b, %ecx
    rdmsr
    orl $0xc00, %eax
    wrmsr
    movl $0x80f, %ecx
    movl $0x1ff, %eax
    xorl %edx, %edx
    wrmsr
    movl $0x832, %ecx
    movl $(0x40000 | {timer_vector}), %eax
    xorl %edx, %edx
    wrmsr

    /* calibrate the work loop: fastest of CALIBRATION_RUNS runs */
    movq $1, {state}(%rbx)
    movq $-1, %r14
    movq ${cal_runs}, %r15
10: rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r13
    movq ${cal_iters}, %r12
11: call 200f
    sti
    outb %al, ${port_yield}
    cli
    incq {yield_exits}(%rbx)
    decq %r12
    jnz 11b
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %r13, %rax
    cmpq %r14, %rax
    jae 12f
    movq %rax, %r14
12: decq %r15
    jnz 10b
    shrq ${cal_shift}, %r14
    jnz 13f
    movq $1, %r14
13: movq %r14, {work_iter_tsc}(%rbx)
    movq {task_work}(%rbx), %rax
    xorl %edx, %edx
    divq %r14
    testq %rax, %rax
    jnz 14f
    movq $1, %rax
14: movq %rax, {work_iters}(%rbx)

    /* start: first probe deadline and first task release one period from now */
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r13
    addq {interval}(%rbx), %rax
    movq %rax, {probe_deadline}(%rbx)
    movq $-1, %rax
    movq {task_period}(%rbx), %rcx
    testq %rcx, %rcx
    jz 15f
    movq %r13, %rax
    addq %rcx, %rax
15: movq %rax, {task_release}(%rbx)
    movq %rax, {job_release}(%rbx)
    movq $2, {state}(%rbx)
    call 300f

/* ---- main loop (IF = 0 except at the preemption points) */
20: cmpq $0, {stop}(%rbx)
    jne 90f
    call 200f
    cmpq $0, {jobs_pending}(%rbx)
    jne 40f
    testq ${flag_busy}, {flags}(%rbx)
    jnz 30f
    movq {irqs}(%rbx), %rax
    cmpq {irqs_seen}(%rbx), %rax
    jne 20b
    sti
    hlt
    cli
    jmp 20b
30: sti
    outb %al, ${port_yield}
    cli
    incq {yield_exits}(%rbx)
    jmp 20b

/* ---- deadline task: one job of work_iters iterations, servicing the timer in between */
40: movq {work_iters}(%rbx), %r12
41: call 200f
    sti
    outb %al, ${port_yield}
    cli
    incq {yield_exits}(%rbx)
    decq %r12
    jnz 41b
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq {job_release}(%rbx), %rcx
    movq %rax, %rdx
    subq %rcx, %rdx
    addq %rdx, {response_sum}(%rbx)
    cmpq {response_max}(%rbx), %rdx
    jbe 42f
    movq %rdx, {response_max}(%rbx)
42: addq {task_period}(%rbx), %rcx
    cmpq %rcx, %rax
    jbe 43f
    incq {glitches}(%rbx)
43: movq %rcx, {job_release}(%rbx)
    incq {jobs_done}(%rbx)
    decq {jobs_pending}(%rbx)
    jmp 20b

/* ---- clean stop */
90: movq $3, {state}(%rbx)
    outb %al, ${port_done}
91: cli
    hlt
    jmp 91b

/* ---- service: consume a timer interrupt, record a latency sample, release a job, re-arm.
   IF = 0. Clobbers rax, rcx, rdx, r8, r9. */
200:
    movq {irqs}(%rbx), %rax
    cmpq {irqs_seen}(%rbx), %rax
    je 209f
    movq %rax, {irqs_seen}(%rbx)
    movq {fired}(%rbx), %r8
    movq {armed}(%rbx), %r9
    movq {probe_deadline}(%rbx), %rax
    cmpq %r9, %rax
    jne 203f
    movq %r8, %rdx
    subq %rax, %rdx
    jns 201f
    incq {early}(%rbx)
    xorl %edx, %edx
201:movq {ring_head}(%rbx), %rcx
    andq ${ring_mask}, %rcx
    movq %rdx, {ring_off}(%rbx,%rcx,8)
    incq {ring_head}(%rbx)
    addq {interval}(%rbx), %rax
    movq %rax, {probe_deadline}(%rbx)
203:movq {task_release}(%rbx), %rax
    cmpq %r9, %rax
    jne 204f
    incq {jobs_pending}(%rbx)
    addq {task_period}(%rbx), %rax
    movq %rax, {task_release}(%rbx)
204:call 300f
209:ret

/* ---- arm: program IA32_TSC_DEADLINE with min(probe_deadline, task_release). IF = 0. */
300:
    movq {probe_deadline}(%rbx), %rax
    movq {task_release}(%rbx), %rdx
    cmpq %rax, %rdx
    cmovbq %rdx, %rax
    movq %rax, {armed}(%rbx)
    movq %rax, %rdx
    shrq $32, %rdx
    movl $0x6e0, %ecx
    wrmsr
    ret

/* ---- fault injection (test hooks) */
800:ud2
801:popcntq %rax, %rax
    jmp 800b
802:movabsq $0x8000000000000000, %rax
    movq (%rax), %rax
    jmp 800b
803:movq $0x7ff00000000, %rax
    movq (%rax), %rax
    jmp 800b

    .globl pvsched_guest_end
pvsched_guest_end:
    .popsection
"#,
    port_fault = const PORT_FAULT,
    port_yield = const PORT_YIELD,
    port_done = const PORT_DONE,
    timer_vector = const TIMER_VECTOR,
    fault_shift = const mailbox::FLAG_FAULT_SHIFT,
    flag_busy = const mailbox::FLAG_BUSY,
    cal_runs = const CALIBRATION_RUNS,
    cal_iters = const CALIBRATION_ITERS,
    cal_shift = const CALIBRATION_ITERS.trailing_zeros(),
    ring_mask = const mailbox::RING_LEN - 1,
    ring_off = const mailbox::RING_OFFSET,
    flags = const offset_of!(Mailbox, flags),
    stop = const offset_of!(Mailbox, stop),
    state = const offset_of!(Mailbox, state),
    interval = const offset_of!(Mailbox, interval_tsc),
    task_period = const offset_of!(Mailbox, task_period_tsc),
    task_work = const offset_of!(Mailbox, task_work_tsc),
    fired = const offset_of!(Mailbox, fired_tsc),
    irqs = const offset_of!(Mailbox, irqs),
    irqs_seen = const offset_of!(Mailbox, irqs_seen),
    armed = const offset_of!(Mailbox, armed_tsc),
    probe_deadline = const offset_of!(Mailbox, probe_deadline),
    task_release = const offset_of!(Mailbox, task_release),
    job_release = const offset_of!(Mailbox, job_release),
    jobs_pending = const offset_of!(Mailbox, jobs_pending),
    ring_head = const offset_of!(Mailbox, ring_head),
    early = const offset_of!(Mailbox, early),
    jobs_done = const offset_of!(Mailbox, jobs_done),
    glitches = const offset_of!(Mailbox, glitches),
    response_max = const offset_of!(Mailbox, response_max),
    response_sum = const offset_of!(Mailbox, response_sum),
    work_iters = const offset_of!(Mailbox, work_iters),
    work_iter_tsc = const offset_of!(Mailbox, work_iter_tsc),
    yield_exits = const offset_of!(Mailbox, yield_exits),
    event_irqs = const offset_of!(Mailbox, event_irqs),
    event_tsc = const offset_of!(Mailbox, event_tsc),
    options(att_syntax)
);

const _: () = assert!(CALIBRATION_ITERS.is_power_of_two());

extern "C" {
    static pvsched_guest_start: u8;
    static pvsched_guest_stubs: u8;
    static pvsched_guest_timer: u8;
    static pvsched_guest_event: u8;
    static pvsched_guest_entry: u8;
    static pvsched_guest_end: u8;
}

/// The guest code and the offsets of its entry points, relative to the image start.
#[derive(Clone, Copy, Debug)]
pub struct GuestImage {
    /// The code, to be copied to a 4 KiB aligned guest-physical address.
    pub code: &'static [u8],
    /// Offset of the 256 exception stubs ([`EXCEPTION_STUB_SIZE`] bytes each).
    pub stubs: u64,
    /// Offset of the timer interrupt handler (IDT vector [`TIMER_VECTOR`]).
    pub timer_handler: u64,
    /// Offset of the external-event handler (IDT vector [`EVENT_VECTOR`]).
    pub event_handler: u64,
    /// Offset of the entry point (`%rbx` = mailbox, `%rsp` = stack top, IF = 0).
    pub entry: u64,
}

/// Returns the guest image linked into this binary.
pub fn image() -> GuestImage {
    let start = &raw const pvsched_guest_start as usize;
    let end = &raw const pvsched_guest_end as usize;
    let off = |p: *const u8| (p as usize - start) as u64;
    // SAFETY: `pvsched_guest_start` and `pvsched_guest_end` delimit one assembled block in a
    // read-only, executable section of this binary, `end` follows `start`, and the bytes are
    // never written.
    let code = unsafe { core::slice::from_raw_parts(start as *const u8, end - start) };
    GuestImage {
        code,
        stubs: off(&raw const pvsched_guest_stubs),
        timer_handler: off(&raw const pvsched_guest_timer),
        event_handler: off(&raw const pvsched_guest_event),
        entry: off(&raw const pvsched_guest_entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_laid_out_as_documented() {
        let img = image();
        assert_eq!(img.stubs, 0, "stubs open the image");
        assert!(img.timer_handler >= 256 * EXCEPTION_STUB_SIZE);
        assert!(img.entry > img.timer_handler);
        assert!((img.entry as usize) < img.code.len());
        assert!(img.code.len() < 0x10000, "image fits the code window");
    }

    #[test]
    fn interrupt_handlers_read_the_tsc_first() {
        let img = image();
        for h in [img.timer_handler, img.event_handler] {
            let h = h as usize;
            assert_eq!(&img.code[h..h + 2], &[0x0f, 0x31], "rdtsc");
        }
    }

    #[test]
    fn stubs_are_sixteen_bytes_apart_and_push_their_vector() {
        let img = image();
        // Vector 6 (#UD) pushes a dummy error code: `6a 00`, then `6a 06`.
        let s6 = (img.stubs + 6 * EXCEPTION_STUB_SIZE) as usize;
        assert_eq!(&img.code[s6..s6 + 4], &[0x6a, 0x00, 0x6a, 0x06]);
        // Vector 13 (#GP) has a CPU-pushed error code: only `6a 0d`.
        let s13 = (img.stubs + 13 * EXCEPTION_STUB_SIZE) as usize;
        assert_eq!(&img.code[s13..s13 + 2], &[0x6a, 0x0d]);
        // Vector 200 pushes `68 c8 00 00 00` (200 does not fit a signed byte).
        let s200 = (img.stubs + 200 * EXCEPTION_STUB_SIZE) as usize;
        assert_eq!(&img.code[s200..s200 + 3], &[0x6a, 0x00, 0x68]);
    }
}
