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
use pvsched_proto::abi::{self, BoostState, Reason};
use pvsched_proto::v3;

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

/* pvsched protocol hooks (docs/protocol.md, "Handshake"). Clobber %rax and %rdx only;
   a no-op unless pv_status says the protocol is enabled. `ring` = 0 makes the request lazy
   even when unboosted: for sections shorter than the host's reaction time (interrupt,
   softirq, preempt-off here), which the host sees at its next look; the RT task rings. */
.macro PV_ENTER bit, idx, ring=1
    cmpq ${pv_enabled}, {pv_status}(%rbx)
    jne .Lpve_done\@
    incq {pv_requests}(%rbx)
    movzbl {slot}+{s_depth}+\idx(%rbx), %eax
    incb {slot}+{s_depth}+\idx(%rbx)
    orl $\bit, {slot}+{s_request}(%rbx)
    incl {slot}+{s_seq}(%rbx)
    mfence
    testl %eax, %eax
    jnz .Lpve_quiet\@
    .if \ring == 0
    jmp .Lpve_quiet\@
    .endif
    cmpl ${st_normal}, {slot}+{s_state}(%rbx)
    jne .Lpve_quiet\@
    movq {pv_port}(%rbx), %rdx
    outb %al, %dx
    incq {pv_boost_rings}(%rbx)
    jmp .Lpve_done\@
.Lpve_quiet\@:
    incq {pv_quiet}(%rbx)
.Lpve_done\@:
.endm

.macro PV_EXIT bit, idx
    cmpq ${pv_enabled}, {pv_status}(%rbx)
    jne .Lpvx_done\@
    decb {slot}+{s_depth}+\idx(%rbx)
    jnz .Lpvx_kept\@
    andl $(~\bit), {slot}+{s_request}(%rbx)
.Lpvx_kept\@:
    incl {slot}+{s_seq}(%rbx)
    mfence
    cmpl $0, {slot}+{s_request}(%rbx)
    jne .Lpvx_done\@
    cmpl ${st_boosted}, {slot}+{s_state}(%rbx)
    jne .Lpvx_done\@
    /* "unboost me" only to a host that negotiated it */
    testb ${f_unboost}, {pv_answer}+4(%rbx)
    jz .Lpvx_done\@
    movq {pv_port}(%rbx), %rdx
    outb %al, %dx
    incq {pv_unboost_rings}(%rbx)
.Lpvx_done\@:
.endm

/* pvsched v3 page hooks (docs/protocol-v3.md). Clobber %rax and %rdx only; no-ops unless
   pv_status says the v3 page is enabled. Critical sections keep their nesting privately and
   publish the aggregate bit, lazily (no doorbell). */
.macro V3_CS_ENTER bit, idx
    cmpq ${pv_enabled_v3}, {pv_status}(%rbx)
    jne .Lv3e\@
    incq {pv_requests}(%rbx)
    incb {pv_v3_depth}+\idx(%rbx)
    orq $\bit, {v3page}+{v3_cs}(%rbx)
    incq {pv_quiet}(%rbx)
.Lv3e\@:
.endm

/* "deboost me": the host says it boosted and asks for a kick, and nothing above the
   baseline is left (no critical section, no RT task). */
.macro V3_KICK
    cmpq $0, {v3page}+{v3_cs}(%rbx)
    jne .Lv3k\@
    cmpq $0, {pv_v3_in_task}(%rbx)
    jne .Lv3k\@
    cmpb $0, {v3page}+{v3_applied}+5(%rbx)
    je .Lv3k\@
    testb $1, {v3page}+{v3_applied}+3(%rbx)
    jz .Lv3k\@
    movq {pv_port}(%rbx), %rdx
    outb %al, %dx
    incq {pv_unboost_rings}(%rbx)
.Lv3k\@:
.endm

.macro V3_CS_EXIT bit, idx
    cmpq ${pv_enabled_v3}, {pv_status}(%rbx)
    jne .Lv3x\@
    decb {pv_v3_depth}+\idx(%rbx)
    jnz .Lv3x\@
    andq $(~\bit), {v3page}+{v3_cs}(%rbx)
    mfence
    V3_KICK
.Lv3x\@:
.endm

/* Publish the task_intent word in mailbox field \src. \raise = 1: the RT task starts (ring
   when the host has not boosted); 0: it ends or the vCPU idles (kick when boosted). */
.macro V3_INTENT src, raise
    cmpq ${pv_enabled_v3}, {pv_status}(%rbx)
    jne .Lv3i\@
    movq \src(%rbx), %rax
    movq %rax, {v3page}+{v3_intent}(%rbx)
    .if \raise
    movq $1, {pv_v3_in_task}(%rbx)
    mfence
    cmpb $0, {v3page}+{v3_applied}+5(%rbx)
    jne .Lv3i\@
    movq {pv_port}(%rbx), %rdx
    outb %al, %dx
    incq {pv_boost_rings}(%rbx)
    .else
    movq $0, {pv_v3_in_task}(%rbx)
    mfence
    V3_KICK
    .endif
.Lv3i\@:
.endm

/* Echo the host's interrupt ticket once the hardirq bit is published. */
.macro V3_ACK
    cmpq ${pv_enabled_v3}, {pv_status}(%rbx)
    jne .Lv3a\@
    movq {v3page}+{v3_ticket}(%rbx), %rax
    testq %rax, %rax
    jz .Lv3a\@
    cmpq %rax, {v3page}+{v3_ack}(%rbx)
    je .Lv3a\@
    movq %rax, {v3page}+{v3_ack}(%rbx)
    incq {pv_acks}(%rbx)
.Lv3a\@:
.endm

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

/* ---- interrupt handlers: timestamp first (into \tsc), then an IRQ request, count (\count),
   EOI, release, return. Clobber only %rax, %rcx, %rdx. */
.macro IRQ_HANDLER tsc, count
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, \tsc(%rbx)
    PV_ENTER {r_irq_bit}, {r_irq}, 0
    V3_CS_ENTER {cs_hardirq}, 1
    V3_ACK
    incq \count(%rbx)
    movl $0x80b, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    PV_EXIT {r_irq_bit}, {r_irq}
    V3_CS_EXIT {cs_hardirq}, 1
    iretq
.endm

    .balign 16
    .globl pvsched_guest_timer
pvsched_guest_timer:
    IRQ_HANDLER {fired}, {irqs}

    .balign 16
    .globl pvsched_guest_event
pvsched_guest_event:
    IRQ_HANDLER {event_tsc}, {event_irqs}

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

    /* pvsched: discover (CPUID), negotiate and register the slot (MSRs) */
    cmpq $0, {pv_offer}(%rbx)
    je 19f
    movq %rbx, %rsi
    movl ${leaf_sig}, %eax
    xorl %ecx, %ecx
    cpuid
    movl %ebx, %r8d
    movq %rsi, %rbx
    cmpl ${sig0}, %r8d
    jne 18f
    cmpl ${sig1}, %ecx
    jne 18f
    cmpl ${sig2}, %edx
    jne 18f
    movl ${leaf_info}, %eax
    xorl %ecx, %ecx
    cpuid
    movq %rsi, %rbx
    movq %rax, {pv_msr_base}(%rbx)
    movq %rdx, {pv_port}(%rbx)
    leal {msr_negotiate}(%rax), %ecx
    movq {pv_offer}(%rbx), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, {pv_answer}(%rbx)
    testw %ax, %ax
    jz 17f
    cmpw ${v3_version}, %ax
    je 16f
    movq {pv_msr_base}(%rbx), %rcx
    addl ${msr_slot}, %ecx
    leaq {slot}+1(%rbx), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movq ${pv_enabled}, {pv_status}(%rbx)
    testq ${flag_rogue}, {flags}(%rbx)
    jnz 700f
    testq ${flag_alternate}, {flags}(%rbx)
    jnz 750f
    testq ${flag_exercise}, {flags}(%rbx)
    jz 19f
    call 600f
    jmp 19f
/* v3 page: the default request unless one is there already (the VMM may prepare another),
   the first intent, then registration; the host answers in the page's header. */
16: cmpl $0, {v3page}+{v3_abi}(%rbx)
    jne 161f
    movl $1, {v3page}+{v3_abi}(%rbx)
    movl $1, {v3page}+{v3_pver}(%rbx)
    movabsq ${v3_default_name}, %rax
    movq %rax, {v3page}+{v3_name}(%rbx)
161:movq {pv_v3_busy}(%rbx), %rax
    movq %rax, {v3page}+{v3_intent}(%rbx)
    movq {pv_msr_base}(%rbx), %rcx
    addl ${msr_slot}, %ecx
    leaq {v3page}+1(%rbx), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    cmpl $1, {v3page}+{v3_status}(%rbx)
    jne 162f
    movq ${pv_enabled_v3}, {pv_status}(%rbx)
    jmp 19f
162:movq ${pv_v3_refused}, {pv_status}(%rbx)
    jmp 19f
17: movq ${pv_no_version}, {pv_status}(%rbx)
    jmp 19f
18: movq ${pv_not_found}, {pv_status}(%rbx)
19:

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
    /* v3: publish the idle intent and leave to the VMM once, so the host sees it before
       the halt (a halt stays in the kernel) */
    V3_INTENT {pv_v3_idle}, 0
    cmpq ${pv_enabled_v3}, {pv_status}(%rbx)
    je 22f
    /* v1: the host learns the deadline just armed at an exit to the VMM. A busy guest
       leaves at its next preemption point, a few instructions after the re-arm; a guest
       about to halt leaves once now (a halt stays in the kernel), or a host thread could
       preempt this vCPU at its wake-up without knowing when it must run again. */
    cmpq ${pv_enabled}, {pv_status}(%rbx)
    jne 21f
    incq {deadline_exits}(%rbx)
22: outb %al, ${port_yield}
21: sti
    hlt
    cli
    V3_INTENT {pv_v3_busy}, 0
    jmp 20b
30: sti
    outb %al, ${port_yield}
    cli
    incq {yield_exits}(%rbx)
    jmp 20b

/* ---- deadline task: one job of work_iters iterations, servicing the timer in between */
40: PV_ENTER {r_rt_bit}, {r_rt}
    V3_INTENT {pv_v3_task}, 1
    movq {work_iters}(%rbx), %r12
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
    PV_EXIT {r_rt_bit}, {r_rt}
    V3_INTENT {pv_v3_busy}, 0
    jmp 20b

/* ---- clean stop */
90: movq $3, {state}(%rbx)
    outb %al, ${port_done}
91: cli
    hlt
    jmp 91b

/* ---- service: consume a timer interrupt, record a latency sample, release a job, re-arm.
   IF = 0. Clobbers rax, rcx, rdx, r8, r9, r10. */
200:
    movq {irqs}(%rbx), %rax
    cmpq {irqs_seen}(%rbx), %rax
    je 209f
    movq %rax, {irqs_seen}(%rbx)
    PV_ENTER {r_softirq_bit}, {r_softirq}, 0
    V3_CS_ENTER {cs_softirq}, 2
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
    movq {interval}(%rbx), %rcx
    call 400f
    addq %r8, {overruns}(%rbx)
    movq %rax, {probe_deadline}(%rbx)
203:movq {task_release}(%rbx), %rax
    cmpq %r9, %rax
    jne 204f
    incq {jobs_pending}(%rbx)
    addq {task_period}(%rbx), %rax
    movq {task_period}(%rbx), %rcx
    call 400f
    movq %rax, {task_release}(%rbx)
    testq %r8, %r8
    jz 204f
    /* xrun: more than a period behind. The skipped releases and the backlog are missed
       jobs; the task restarts with the release just before now. */
    addq %r8, {task_missed}(%rbx)
    movq {jobs_pending}(%rbx), %rcx
    decq %rcx
    addq %rcx, {task_missed}(%rbx)
    movq $1, {jobs_pending}(%rbx)
    subq {task_period}(%rbx), %rax
    movq %rax, {job_release}(%rbx)
204:call 300f
    PV_EXIT {r_softirq_bit}, {r_softirq}
    V3_CS_EXIT {cs_softirq}, 2
209:ret

/* ---- arm: program IA32_TSC_DEADLINE with min(probe_deadline, task_release). IF = 0. */
300:
    PV_ENTER {r_preempt_bit}, {r_preempt}, 0
    V3_CS_ENTER {cs_preempt}, 3
    movq {probe_deadline}(%rbx), %rax
    movq {task_release}(%rbx), %rdx
    cmpq %rax, %rdx
    cmovbq %rdx, %rax
    movq %rax, {armed}(%rbx)
    movq %rax, {slot}+{s_deadline}(%rbx)
    movq %rax, %rdx
    shrq $32, %rdx
    movl $0x6e0, %ecx
    wrmsr
    PV_EXIT {r_preempt_bit}, {r_preempt}
    V3_CS_EXIT {cs_preempt}, 3
    ret

/* ---- skip missed periods (cyclictest's rule): %rax = next deadline, %rcx = period. Returns
   in %rax the first deadline after now on the same period grid and in %r8 the periods
   skipped (0 when %rax was in the future). IF = 0. Clobbers rdx, r8, r10. */
400:movq %rax, %r10
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    xorl %r8d, %r8d
    subq %r10, %rax
    jb 401f
    xorl %edx, %edx
    divq %rcx
    leaq 1(%rax), %r8
    movq %r8, %rax
    mulq %rcx
    addq %rax, %r10
401:movq %r10, %rax
    ret

/* ---- lazy-request exercise (test hook): hold an RT request, wait (bounded) for the host
   to boost, then mark, make pv_exercise_iters nested softirq requests, mark, release. */
600:
    PV_ENTER {r_rt_bit}, {r_rt}
    movq $200000, %r12
601:cmpl ${st_boosted}, {slot}+{s_state}(%rbx)
    je 602f
    decq %r12
    jnz 601b
602:movb $1, %al
    outb %al, ${port_mark}
    movq {pv_exercise_iters}(%rbx), %r12
    testq %r12, %r12
    jz 604f
603:PV_ENTER {r_softirq_bit}, {r_softirq}
    PV_EXIT {r_softirq_bit}, {r_softirq}
    decq %r12
    jnz 603b
604:movb $2, %al
    outb %al, ${port_mark}
    PV_EXIT {r_rt_bit}, {r_rt}
    ret

/* ---- rogue guest (test hook): hold a preempt-off request forever, stay stoppable */
700:PV_ENTER {r_preempt_bit}, {r_preempt}
    movq $2, {state}(%rbx)
701:cmpq $0, {stop}(%rbx)
    jne 90b
    sti
    outb %al, ${port_yield}
    cli
    incq {yield_exits}(%rbx)
    jmp 701b

/* ---- alternating guest: an RT-task request and an IRQ request in turns, each held for
   pv_alternate_tsc cycles, one entered before the other is left (never empty) */
750:movq $2, {state}(%rbx)
    PV_ENTER {r_rt_bit}, {r_rt}
751:call 755f
    PV_ENTER {r_irq_bit}, {r_irq}
    PV_EXIT {r_rt_bit}, {r_rt}
    call 755f
    PV_ENTER {r_rt_bit}, {r_rt}
    PV_EXIT {r_irq_bit}, {r_irq}
    jmp 751b
/* one phase: interruptible busy wait; a stop leaves for the clean stop. Clobbers rax, rdx,
   r12. */
755:rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r12
    addq {pv_alternate}(%rbx), %r12
756:cmpq $0, {stop}(%rbx)
    jne 758f
    sti
    outb %al, ${port_yield}
    cli
    incq {yield_exits}(%rbx)
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    cmpq %r12, %rax
    jb 756b
    ret
758:addq $8, %rsp
    jmp 90b

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
    port_mark = const PORT_MARK,
    flag_exercise = const mailbox::FLAG_PV_EXERCISE,
    flag_rogue = const mailbox::FLAG_PV_ROGUE,
    flag_alternate = const mailbox::FLAG_PV_ALTERNATE,
    pv_alternate = const offset_of!(Mailbox, pv_alternate_tsc),
    pv_enabled = const mailbox::pv_status::ENABLED,
    pv_no_version = const mailbox::pv_status::NO_VERSION,
    pv_not_found = const mailbox::pv_status::NOT_FOUND,
    slot = const mailbox::SLOT_OFFSET,
    s_seq = const abi::off::SEQ,
    s_request = const abi::off::REQUEST,
    s_depth = const abi::off::DEPTH,
    s_deadline = const abi::off::DEADLINE_TSC,
    s_state = const abi::off::STATE,
    st_normal = const BoostState::Normal as u32,
    st_boosted = const BoostState::Boosted as u32,
    r_irq = const Reason::Irq.index(),
    r_irq_bit = const Reason::Irq.bit(),
    r_softirq = const Reason::Softirq.index(),
    r_softirq_bit = const Reason::Softirq.bit(),
    r_rt = const Reason::RtTask.index(),
    r_rt_bit = const Reason::RtTask.bit(),
    r_preempt = const Reason::PreemptDisabled.index(),
    r_preempt_bit = const Reason::PreemptDisabled.bit(),
    leaf_sig = const abi::CPUID_LEAF_SIGNATURE,
    leaf_info = const abi::CPUID_LEAF_INFO,
    sig0 = const sig_word(0),
    sig1 = const sig_word(4),
    sig2 = const sig_word(8),
    msr_negotiate = const abi::MSR_NEGOTIATE,
    msr_slot = const abi::MSR_SLOT,
    timer_vector = const TIMER_VECTOR,
    fault_shift = const mailbox::FLAG_FAULT_SHIFT,
    flag_busy = const mailbox::FLAG_BUSY,
    f_unboost = const abi::feature::UNBOOST_DOORBELL,
    overruns = const offset_of!(Mailbox, overruns),
    deadline_exits = const offset_of!(Mailbox, deadline_exits),
    task_missed = const offset_of!(Mailbox, task_missed),
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
    pv_offer = const offset_of!(Mailbox, pv_offer),
    pv_exercise_iters = const offset_of!(Mailbox, pv_exercise_iters),
    pv_status = const offset_of!(Mailbox, pv_status),
    pv_msr_base = const offset_of!(Mailbox, pv_msr_base),
    pv_port = const offset_of!(Mailbox, pv_port),
    pv_answer = const offset_of!(Mailbox, pv_answer),
    pv_requests = const offset_of!(Mailbox, pv_requests),
    pv_quiet = const offset_of!(Mailbox, pv_quiet),
    pv_boost_rings = const offset_of!(Mailbox, pv_boost_rings),
    pv_unboost_rings = const offset_of!(Mailbox, pv_unboost_rings),
    pv_enabled_v3 = const mailbox::pv_status::ENABLED_V3,
    pv_v3_refused = const mailbox::pv_status::V3_REFUSED,
    pv_v3_task = const offset_of!(Mailbox, pv_v3_task),
    pv_v3_busy = const offset_of!(Mailbox, pv_v3_busy),
    pv_v3_idle = const offset_of!(Mailbox, pv_v3_idle),
    pv_v3_depth = const offset_of!(Mailbox, pv_v3_depth),
    pv_v3_in_task = const offset_of!(Mailbox, pv_v3_in_task),
    pv_acks = const offset_of!(Mailbox, pv_acks),
    v3page = const mailbox::V3_PAGE_OFFSET,
    v3_version = const v3::PVSCHED_VERSION_V3,
    v3_abi = const v3::off::ABI_VERSION,
    v3_pver = const v3::off::POLICY_VERSION,
    v3_name = const v3::off::POLICY_NAME,
    v3_status = const v3::off::STATUS,
    v3_intent = const v3::off::TASK_INTENT,
    v3_cs = const v3::off::CS_STATE,
    v3_ack = const v3::off::INTERRUPT_ACK,
    v3_applied = const v3::off::APPLIED_STATE,
    v3_ticket = const v3::off::INTERRUPT_TICKET,
    v3_default_name = const u64::from_le_bytes(*b"default\0"),
    cs_hardirq = const v3::cs::HARDIRQ,
    cs_softirq = const v3::cs::SOFTIRQ,
    cs_preempt = const v3::cs::PREEMPT_DISABLED,
    options(att_syntax)
);

const _: () = assert!(CALIBRATION_ITERS.is_power_of_two());

/// Word `i/4` of the CPUID signature, as the guest compares it with EBX/ECX/EDX.
const fn sig_word(i: usize) -> u32 {
    let s = abi::CPUID_SIGNATURE;
    u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]])
}

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
