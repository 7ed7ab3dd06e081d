// SPDX-License-Identifier: GPL-2.0-only
/*
 * pvsched guest module: tells the host which guest CPUs need their vCPU thread boosted.
 *
 * Protocol: pvsched version 1 (docs/protocol.md in the pvsched repository), over QEMU's
 * ivshmem-doorbell device whose server is `pvsched daemon --ivshmem PATH` (section 13 there,
 * "Transport: ivshmem"). The device's shared memory (BAR2) starts with a transport header
 * (the host's offer, then this module's answer) followed by one 128-byte slot per guest CPU.
 *
 * Requests, each counted per reason with a nesting depth in the slot:
 *   - IRQ: a device interrupt handler (irq_handler_entry/exit) or the local APIC timer
 *     interrupt (local_timer_entry/exit);
 *   - SOFTIRQ: softirq processing (softirq_entry/exit);
 *   - RT_TASK: a user SCHED_FIFO/RR/DEADLINE task runs on the CPU (sched_switch).
 * Deadline hint (when the host offers DEADLINE_HINT with CLOCK_STAMP): the expiry of the last
 * timer a user RT task armed from task context on the CPU (hrtimer_start: e.g. cyclictest's
 * clock_nanosleep), as guest TSC, so the host can boost the vCPU just before it is due. Each
 * doorbell is preceded by the guest TSC in the slot's stamp, from which the host estimates the
 * guest's TSC offset; a new hint the host has not seen rings once when the RT task leaves the
 * CPU (if no "unboost me" rang then).
 * The guest half of a slot is written only by its own CPU, with interrupts disabled, so it has
 * a single writer. The doorbell (BAR0 register 12) rings only when the host must act at once:
 * a new request while the host publishes Normal ("boost me", for the reasons in ring_mask), or
 * the last release while it publishes Boosted ("unboost me").
 *
 * The tracepoints are found by name with for_each_kernel_tracepoint(), so the module needs no
 * kernel patch; they need a GPL-compatible module licence.
 */
#include <linux/atomic.h>
#include <linux/hrtimer.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/math64.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/percpu.h>
#include <linux/sched.h>
#include <linux/sched/deadline.h>
#include <linux/sched/rt.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <asm/tsc.h>

#define IVSHMEM_VENDOR_ID 0x1af4
#define IVSHMEM_DEVICE_ID 0x1110
/* BAR0 registers of ivshmem. */
#define IVSHMEM_IVPOSITION 8
#define IVSHMEM_DOORBELL 12

/* Transport header (docs/protocol.md, section 13). Host part. */
#define HDR_MAGIC 0x00		/* u64: "pvschedI" */
#define HDR_TRANSPORT 0x08	/* u32: transport version, 1 */
#define HDR_VERSIONS 0x0c	/* u32: protocol versions offered (bit v = version v) */
#define HDR_FEATURES 0x10	/* u32: features offered */
#define HDR_SLOTS 0x14		/* u32: slots available */
#define HDR_SLOT_OFFSET 0x18	/* u32: offset of slot 0 (128-byte aligned) */
#define HDR_PEER 0x1c		/* u32: ivshmem peer id that owns the doorbell vector */
#define HDR_VECTOR 0x20		/* u32: that peer's vector */
/* Guest part (its own cache line). */
#define HDR_ANSWER 0x40		/* u64: chosen version | accepted features << 32 */
#define HDR_CPUS 0x48		/* u32: slots in use (guest CPUs 0 .. n-1) */
#define HDR_STATUS 0x4c		/* u32: 1 slots in use, 0 none */

#define TRANSPORT_MAGIC 0x4964656863737670ULL /* "pvschedI", little-endian */
#define TRANSPORT_VERSION 1
#define PROTOCOL_VERSION 1

#define FEATURE_DEADLINE_HINT (1u << 0)
#define FEATURE_UNBOOST_DOORBELL (1u << 2)
#define FEATURE_CLOCK_STAMP (1u << 3)

/* Slot layout (docs/protocol.md, section 6). */
#define SLOT_SIZE 128
#define SLOT_SEQ 0x00
#define SLOT_REQUEST 0x04
#define SLOT_DEPTH 0x08
#define SLOT_DEADLINE 0x10
#define SLOT_STAMP 0x20
#define SLOT_STATE 0x40

#define REASON_IRQ 0
#define REASON_SOFTIRQ 2
#define REASON_RT_TASK 3

#define STATE_NORMAL 1
#define STATE_BOOSTED 2

static unsigned int ring_mask = (1u << REASON_IRQ) | (1u << REASON_RT_TASK);
module_param(ring_mask, uint, 0444);
MODULE_PARM_DESC(ring_mask,
		 "reasons (bit 0 irq, 2 softirq, 3 rt task) whose new request rings \"boost me\"");

static bool unboost_ring = true;
module_param(unboost_ring, bool, 0444);
MODULE_PARM_DESC(unboost_ring, "ring \"unboost me\" at the last release (if the host offers it)");

static bool deadline_hint = true;
module_param(deadline_hint, bool, 0444);
MODULE_PARM_DESC(deadline_hint,
		 "publish user RT tasks' next timer expiry (if the host offers deadline hints with the clock stamp)");

static bool hook_softirq = true;
module_param(hook_softirq, bool, 0444);
MODULE_PARM_DESC(hook_softirq, "request a boost while softirqs run");

struct pv_dev {
	void __iomem *regs;
	u8 *shm;		/* BAR2, mapped write-back */
	u32 doorbell;		/* (peer << 16) | vector */
	u32 nslots;
	u32 slot_offset;
	bool unboost_bell;
	bool hints;		/* deadline hints, each doorbell stamped */
};

/* Counted per CPU, printed at unload: what the host's own counts must match. */
struct pv_counts {
	u64 rings;		/* doorbell writes */
	u64 updates;		/* seq bumps */
	u64 unbalanced;		/* releases without a request (a hook registered mid-section) */
	u64 hints;		/* deadlines published */
};

static struct pv_dev *pv;
static DEFINE_PER_CPU(struct pv_counts, pv_counts);
/* Whether this CPU's RT_TASK request is held (sched_switch is its only writer). */
static DEFINE_PER_CPU(bool, rt_held);
/* A deadline published since this CPU's last doorbell. */
static DEFINE_PER_CPU(bool, hint_unsent);

static inline u8 *slot_of(unsigned int cpu)
{
	if (!pv || cpu >= pv->nslots)
		return NULL;
	return pv->shm + pv->slot_offset + (size_t)cpu * SLOT_SIZE;
}

/* Interrupts must be disabled. */
static inline void ring(u8 *slot)
{
	if (pv->hints) {
		/* The stamp is stored before the doorbell's MMIO write (x86 keeps stores in order). */
		WRITE_ONCE(*(u64 *)(slot + SLOT_STAMP), rdtsc());
		__this_cpu_write(hint_unsent, false);
	}
	writel(pv->doorbell, pv->regs + IVSHMEM_DOORBELL);
	this_cpu_inc(pv_counts.rings);
}

/* Steps 1-4 of "request(r)" / "release(r)"; interrupts must be disabled. */
static void slot_change(unsigned int reason, bool enter)
{
	u8 *slot = slot_of(smp_processor_id());
	u32 *seq, *request, state;
	u8 *depth, d;

	if (!slot)
		return;
	seq = (u32 *)(slot + SLOT_SEQ);
	request = (u32 *)(slot + SLOT_REQUEST);
	depth = slot + SLOT_DEPTH + reason;
	d = READ_ONCE(*depth);
	if (enter) {
		if (d == 0xff)
			return;
		WRITE_ONCE(*depth, d + 1);
		if (d == 0)
			WRITE_ONCE(*request, READ_ONCE(*request) | (1u << reason));
	} else {
		if (d == 0) {
			this_cpu_inc(pv_counts.unbalanced);
			return;
		}
		WRITE_ONCE(*depth, d - 1);
		if (d == 1)
			WRITE_ONCE(*request, READ_ONCE(*request) & ~(1u << reason));
	}
	WRITE_ONCE(*seq, READ_ONCE(*seq) + 1);
	this_cpu_inc(pv_counts.updates);
	/* Orders the stores above before the load of the host's state (protocol section 7). */
	smp_mb();
	state = READ_ONCE(*(u32 *)(slot + SLOT_STATE));
	if (enter) {
		if (d == 0 && state == STATE_NORMAL && (ring_mask & (1u << reason)))
			ring(slot);
	} else if (READ_ONCE(*request) == 0 && state == STATE_BOOSTED && pv->unboost_bell) {
		ring(slot);
	} else if (reason == REASON_RT_TASK && __this_cpu_read(hint_unsent) &&
		   (state == STATE_NORMAL || state == STATE_BOOSTED)) {
		/* The RT task sleeps until its new deadline: the host must learn it now. */
		ring(slot);
	}
}

static void change(unsigned int reason, bool enter)
{
	unsigned long flags;

	local_irq_save(flags);
	slot_change(reason, enter);
	local_irq_restore(flags);
}

static void probe_irq_entry(void *data, int irq, struct irqaction *action)
{
	change(REASON_IRQ, true);
}

static void probe_irq_exit(void *data, int irq, struct irqaction *action, int ret)
{
	change(REASON_IRQ, false);
}

static void probe_timer_entry(void *data, int vector)
{
	change(REASON_IRQ, true);
}

static void probe_timer_exit(void *data, int vector)
{
	change(REASON_IRQ, false);
}

static void probe_softirq_entry(void *data, unsigned int vec)
{
	change(REASON_SOFTIRQ, true);
}

static void probe_softirq_exit(void *data, unsigned int vec)
{
	change(REASON_SOFTIRQ, false);
}

static void probe_switch(void *data, bool preempt, struct task_struct *prev,
			 struct task_struct *next, unsigned int prev_state)
{
	/*
	 * User RT tasks only: the kernel's own FIFO threads (the migration/N stopper, threaded
	 * interrupts) run briefly and would cost a boost and an unboost each.
	 */
	bool rt = (rt_task(next) || dl_task(next)) && !(next->flags & PF_KTHREAD);

	/* Runs with interrupts disabled (the runqueue lock is held). */
	if (rt == __this_cpu_read(rt_held))
		return;
	__this_cpu_write(rt_held, rt);
	slot_change(REASON_RT_TASK, rt);
}

/*
 * A timer armed by a user RT task from task context: its expiry (the task's next wake-up, for
 * a sleep) becomes the CPU's deadline hint. Runs with interrupts disabled (the timer base's
 * lock is held).
 */
static void probe_hrtimer_start(void *data, struct hrtimer *timer, enum hrtimer_mode mode)
{
	u8 *slot;
	s64 delta;
	u64 tsc;

	if (!pv || !pv->hints || !in_task() || (current->flags & PF_KTHREAD) ||
	    !(rt_task(current) || dl_task(current)))
		return;
	slot = slot_of(smp_processor_id());
	if (!slot)
		return;
	delta = ktime_to_ns(ktime_sub(hrtimer_get_expires(timer), timer->base->get_time()));
	if (delta < 0)
		delta = 0;
	tsc = rdtsc() + mul_u64_u32_div(delta, tsc_khz, NSEC_PER_MSEC);
	WRITE_ONCE(*(u64 *)(slot + SLOT_DEADLINE), tsc ? tsc : 1);
	WRITE_ONCE(*(u32 *)(slot + SLOT_SEQ), READ_ONCE(*(u32 *)(slot + SLOT_SEQ)) + 1);
	this_cpu_inc(pv_counts.updates);
	this_cpu_inc(pv_counts.hints);
	__this_cpu_write(hint_unsent, true);
}

struct hook {
	const char *name;
	void *probe;
	struct tracepoint *tp;
	bool registered;
};

static struct hook hooks[] = {
	{ "local_timer_entry", probe_timer_entry },
	{ "local_timer_exit", probe_timer_exit },
	{ "irq_handler_entry", probe_irq_entry },
	{ "irq_handler_exit", probe_irq_exit },
	{ "softirq_entry", probe_softirq_entry },
	{ "softirq_exit", probe_softirq_exit },
	{ "sched_switch", probe_switch },
	{ "hrtimer_start", probe_hrtimer_start },
};

static void find_tracepoint(struct tracepoint *tp, void *priv)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(hooks); i++)
		if (!strcmp(tp->name, hooks[i].name))
			hooks[i].tp = tp;
}

static bool wanted(const struct hook *h)
{
	if (!strcmp(h->name, "hrtimer_start"))
		return pv && pv->hints;
	return hook_softirq || strncmp(h->name, "softirq", 7);
}

static bool is_exit(const struct hook *h)
{
	size_t n = strlen(h->name);

	return n > 5 && !strcmp(h->name + n - 5, "_exit");
}

static void unregister_hooks(void)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(hooks); i++) {
		if (hooks[i].registered)
			tracepoint_probe_unregister(hooks[i].tp, hooks[i].probe, NULL);
		hooks[i].registered = false;
	}
	/* No probe runs after this; release_cpu() then clears what an entry left behind. */
	tracepoint_synchronize_unregister();
}

static int register_hooks(void)
{
	size_t i;
	int pass, err;

	for_each_kernel_tracepoint(find_tracepoint, NULL);
	for (i = 0; i < ARRAY_SIZE(hooks); i++) {
		if (wanted(&hooks[i]) && !hooks[i].tp) {
			pr_err("pvsched_guest: tracepoint %s not found\n", hooks[i].name);
			return -ENOENT;
		}
	}
	/*
	 * Exits first, so that every request made has its release; a release without its
	 * request (a section that began before its entry hook) leaves the slot unchanged.
	 */
	for (pass = 0; pass < 2; pass++) {
		for (i = 0; i < ARRAY_SIZE(hooks); i++) {
			if (!wanted(&hooks[i]) || is_exit(&hooks[i]) != (pass == 0))
				continue;
			err = tracepoint_probe_register(hooks[i].tp, hooks[i].probe, NULL);
			if (err) {
				pr_err("pvsched_guest: cannot hook %s: %d\n", hooks[i].name, err);
				unregister_hooks();
				return err;
			}
			hooks[i].registered = true;
		}
	}
	return 0;
}

/* Releases whatever this CPU still requests (called on each CPU at unload). */
static void release_cpu(void *unused)
{
	u8 *slot = slot_of(smp_processor_id());
	unsigned int r;

	if (!slot)
		return;
	for (r = 0; r < 8; r++) {
		while (READ_ONCE(slot[SLOT_DEPTH + r]))
			slot_change(r, false);
	}
	__this_cpu_write(rt_held, false);
}

static int pv_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct pv_dev *d;
	resource_size_t len;
	u32 versions, features, nslots, cpu;
	int err;

	if (pv)
		return -EBUSY; /* one transport per guest */
	d = devm_kzalloc(&pdev->dev, sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	d->regs = pcim_iomap(pdev, 0, 0);
	if (!d->regs)
		return -ENOMEM;
	len = pci_resource_len(pdev, 2);
	if (len < 4096) {
		dev_err(&pdev->dev, "pvsched: shared memory of %llu bytes is too small\n",
			(unsigned long long)len);
		return -EINVAL;
	}
	d->shm = devm_memremap(&pdev->dev, pci_resource_start(pdev, 2), len, MEMREMAP_WB);
	if (IS_ERR(d->shm))
		return PTR_ERR(d->shm);
	if (READ_ONCE(*(u64 *)(d->shm + HDR_MAGIC)) != TRANSPORT_MAGIC ||
	    READ_ONCE(*(u32 *)(d->shm + HDR_TRANSPORT)) != TRANSPORT_VERSION) {
		dev_info(&pdev->dev, "pvsched: ivshmem device without a pvsched header\n");
		return -ENODEV;
	}
	versions = READ_ONCE(*(u32 *)(d->shm + HDR_VERSIONS));
	features = READ_ONCE(*(u32 *)(d->shm + HDR_FEATURES));
	nslots = READ_ONCE(*(u32 *)(d->shm + HDR_SLOTS));
	d->slot_offset = READ_ONCE(*(u32 *)(d->shm + HDR_SLOT_OFFSET));
	d->doorbell = (READ_ONCE(*(u32 *)(d->shm + HDR_PEER)) << 16) |
		      (READ_ONCE(*(u32 *)(d->shm + HDR_VECTOR)) & 0xffff);
	if (!(versions & (1u << PROTOCOL_VERSION))) {
		/* No common version is not an error: this guest runs without boosting. */
		dev_info(&pdev->dev, "pvsched: host offers no version 1 (versions %#x)\n",
			 versions);
		return -ENODEV;
	}
	if (d->slot_offset % SLOT_SIZE || d->slot_offset < 4096 ||
	    (u64)d->slot_offset + (u64)nslots * SLOT_SIZE > len) {
		dev_err(&pdev->dev, "pvsched: bad slot area (offset %u, %u slots, %llu bytes)\n",
			d->slot_offset, nslots, (unsigned long long)len);
		return -EINVAL;
	}
	d->nslots = min_t(u32, nslots, nr_cpu_ids);
	if (d->nslots < num_possible_cpus())
		dev_warn(&pdev->dev, "pvsched: %u slots for %u CPUs: the others run unboosted\n",
			 d->nslots, num_possible_cpus());
	/*
	 * The synchronous unboost, and deadline hints when the host can place them in its own
	 * time (the clock stamp); vCPU hints are not published.
	 */
	if (!deadline_hint || !boot_cpu_has(X86_FEATURE_TSC) || !tsc_khz ||
	    (features & (FEATURE_DEADLINE_HINT | FEATURE_CLOCK_STAMP)) !=
		    (FEATURE_DEADLINE_HINT | FEATURE_CLOCK_STAMP))
		features &= ~(FEATURE_DEADLINE_HINT | FEATURE_CLOCK_STAMP);
	features &= FEATURE_UNBOOST_DOORBELL | FEATURE_DEADLINE_HINT | FEATURE_CLOCK_STAMP;
	d->unboost_bell = unboost_ring && (features & FEATURE_UNBOOST_DOORBELL);
	d->hints = features & FEATURE_DEADLINE_HINT;
	for (cpu = 0; cpu < d->nslots; cpu++)
		memset(d->shm + d->slot_offset + (size_t)cpu * SLOT_SIZE, 0, 64);
	WRITE_ONCE(*(u64 *)(d->shm + HDR_ANSWER), PROTOCOL_VERSION | ((u64)features << 32));
	WRITE_ONCE(*(u32 *)(d->shm + HDR_CPUS), d->nslots);
	smp_wmb();
	WRITE_ONCE(*(u32 *)(d->shm + HDR_STATUS), 1);
	pv = d;
	pci_set_drvdata(pdev, d);
	err = register_hooks();
	if (err) {
		WRITE_ONCE(*(u32 *)(d->shm + HDR_STATUS), 0);
		pv = NULL;
		return err;
	}
	dev_info(&pdev->dev,
		 "pvsched: protocol 1, features %#x, %u slots, doorbell peer %u vector %u, guest id %u\n",
		 features, d->nslots, d->doorbell >> 16, d->doorbell & 0xffff,
		 readl(d->regs + IVSHMEM_IVPOSITION));
	return 0;
}

static void pv_remove(struct pci_dev *pdev)
{
	struct pv_dev *d = pci_get_drvdata(pdev);
	u64 rings = 0, updates = 0, unbalanced = 0, hints = 0;
	int cpu;

	if (!d || d != pv)
		return;
	unregister_hooks();
	on_each_cpu(release_cpu, NULL, 1);
	WRITE_ONCE(*(u32 *)(d->shm + HDR_STATUS), 0);
	for_each_possible_cpu(cpu) {
		struct pv_counts *c = per_cpu_ptr(&pv_counts, cpu);
		u8 *slot = slot_of(cpu);

		rings += c->rings;
		updates += c->updates;
		unbalanced += c->unbalanced;
		hints += c->hints;
		if (slot)
			pr_info("pvsched_guest: cpu %d seq %u rings %llu\n", cpu,
				READ_ONCE(*(u32 *)(slot + SLOT_SEQ)), c->rings);
	}
	pr_info("pvsched_guest: total rings %llu updates %llu unbalanced %llu hints %llu\n",
		rings, updates, unbalanced, hints);
	pv = NULL;
}

static const struct pci_device_id pv_ids[] = {
	{ PCI_DEVICE(IVSHMEM_VENDOR_ID, IVSHMEM_DEVICE_ID) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, pv_ids);

static struct pci_driver pv_driver = {
	.name = "pvsched_guest",
	.id_table = pv_ids,
	.probe = pv_probe,
	.remove = pv_remove,
};
module_pci_driver(pv_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pvsched guest: vCPU boost requests over ivshmem-doorbell");
