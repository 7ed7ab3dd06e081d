//! Command-line interface definitions.

use clap::{Args, Parser, Subcommand, ValueEnum};
use pvsched_bench::experiment::Layout;
use pvsched_host::trace::TraceConfig;
use pvsched_host::SchedClass;
use std::path::PathBuf;
use std::time::Duration;

/// Cooperative host/guest vCPU scheduling for KVM.
#[derive(Debug, Parser)]
#[command(name = "pvsched", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the testbed micro-VM and report guest wake-up latency, deadline-task glitches and
    /// host impact.
    Vm(VmArgs),
    /// Compare vanilla, dynamic, deadline-aware and static-RT boosting side by side on this
    /// machine (idle and busy host, 500 and 1000 µs), with tables, JSON and plots.
    Bench(BenchArgs),
    /// Boost the vCPU threads of running VMs (QEMU, crosvm, cloud-hypervisor, Firecracker,
    /// pvsched) from KVM/timer tracepoints, until SIGINT/SIGTERM.
    Daemon(DaemonArgs),
    /// Talk to a running daemon: status | enable [vm] | disable [vm] | driver <vm> <name> [k=v..].
    Ctl(CtlArgs),
}

/// Default control socket of the daemon.
pub const DEFAULT_SOCKET: &str = "/run/pvsched.sock";
/// Default state file of the daemon.
pub const DEFAULT_STATE: &str = "/run/pvsched.state";

/// `pvsched daemon` options.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Read everything from this TOML file instead of the options below (see README).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A VMM process whose vCPU threads to boost, found by name (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<i32>,
    /// A QEMU QMP socket: vCPU threads from `query-cpus-fast` (repeatable).
    #[arg(long = "qmp")]
    pub qmps: Vec<PathBuf>,
    /// Explicit vCPU thread ids of one VM, comma-separated in vCPU order (repeatable).
    #[arg(long = "tids", value_delimiter = ',', num_args = 1)]
    pub tids: Vec<i32>,
    /// Serve Prometheus metrics on this local address, e.g. 127.0.0.1:9477.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Allow a --metrics address that is not loopback.
    #[arg(long)]
    pub metrics_public: bool,
    /// Follow VMs starting and stopping: attach any process with vCPU-named threads.
    #[arg(long)]
    pub watch: bool,
    /// Policy driver.
    #[arg(long, default_value = "dynamic")]
    pub policy: String,
    /// Policy option, key=value (repeatable).
    #[arg(long = "policy-opt", value_name = "KEY=VALUE")]
    pub policy_opts: Vec<String>,
    /// When the dynamic drivers boost: `contended` (a vCPU only while it waits for a CPU when
    /// unboosted, from its run delay in /proc/<tid>/schedstat) or `always`.
    #[arg(long, value_enum, default_value_t = BoostWhen::Contended)]
    pub boost_when: BoostWhen,
    /// At most this many vCPU threads boosted at once (a boost over it waits, earliest
    /// deadline first): a number, `auto` (host CPUs − 1, at least 1) or `off`.
    #[arg(long, value_name = "N|auto|off", default_value = "auto", value_parser = parse_max_boosted)]
    pub max_boosted: MaxBoosted,
    /// Keep every attached vCPU thread (in a fair policy) on an EEVDF custom slice of this
    /// length between boosts, e.g. 100us (100us to 100ms): a waking vCPU gets an earlier
    /// turn, at no extra CPU share. Taken back when the daemon lets the thread go.
    #[arg(long, value_name = "DURATION", value_parser = pvsched_daemon::config::parse_base_slice)]
    pub base_slice: Option<u64>,
    /// Keep the main thread of each attached VM's process (not a vCPU thread) on an EEVDF
    /// custom slice of this length, e.g. 100us: under QEMU TCG that thread runs the guest's
    /// timers and wakes the vCPUs. Not a boost: no real-time class and no extra CPU share.
    /// Taken back when the daemon lets the VM go.
    #[arg(long, value_name = "DURATION", value_parser = pvsched_daemon::config::parse_vmm_slice)]
    pub vmm_slice: Option<u64>,
    /// How the engine thread outranks the vCPU threads it boosts: `fifo` (one FIFO priority
    /// above the boost class) or `deadline` (a SCHED_DEADLINE reservation of 300 µs per ms
    /// that may reclaim unused bandwidth: above every FIFO priority and outside real-time
    /// balancing, so its wake-ups do not get a boosted vCPU pushed onto another CPU; FIFO
    /// where the kernel refuses it). Measured: no gain over `fifo` here (README, "Where the
    /// engine thread runs").
    #[arg(long, value_name = "fifo|deadline", default_value = "fifo")]
    pub engine_class: pvsched_host::mechanism::EngineClass,
    /// Owner (effective uid) whose VMs may be boosted (repeatable; default: root only).
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// Group whose VMs may be boosted (repeatable), e.g. libvirt's `qemu` group.
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gids: Vec<u32>,
    /// Group that may read `ctl status` (the socket becomes 0660, owned by it); changes stay
    /// root's. Without it the socket is 0600.
    #[arg(long = "ctl-group", value_name = "GID")]
    pub ctl_group: Option<u32>,
    /// Serve QEMU's `ivshmem-doorbell` devices on this Unix socket: a Linux guest with the
    /// pvsched guest module (guest/linux/module) then tells the daemon what its vCPUs need
    /// (QEMU: `-chardev socket,path=PATH,id=pv -device ivshmem-doorbell,chardev=pv`).
    #[arg(long, value_name = "PATH")]
    pub ivshmem: Option<PathBuf>,
    /// Tracepoints feeding the policy: a comma list of `timer` (LAPIC timer expiry, KVM),
    /// `wakeup` (kvm_vcpu_wakeup), `irq` (kvm_apic_accept_irq), `waking` (sched_waking of the
    /// vCPU thread: any VMM, also QEMU under TCG), or `none`.
    #[arg(long, default_value = "timer", value_parser = parse_host_events)]
    pub host_events: HostEvents,
    /// Control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// State file (what to restore after a crash).
    #[arg(long, default_value = DEFAULT_STATE)]
    pub state_file: PathBuf,
    /// Only restore what a previous daemon left boosted, then exit.
    #[arg(long)]
    pub recover_only: bool,
}

/// `pvsched ctl` options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Control socket of the daemon.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The request: status | enable [vm] | disable [vm] | driver <vm> <name> [key=value ...].
    #[arg(required = true, trailing_var_arg = true)]
    pub request: Vec<String>,
}

/// Host load of `pvsched bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchLoadArg {
    /// Built-in CPU hogs, one per CPU.
    Builtin,
    /// `stress-ng --cpu <CPUs>` (must be installed).
    StressNg,
}

/// The guest `pvsched bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchGuest {
    /// pvsched's bare-metal testbed guest on real KVM (the full matrix).
    Testbed,
    /// A Linux guest (guest/linux/build.sh) under QEMU TCG running cyclictest: idle /
    /// stress-ng host × none / static / daemon (host-only, sched_waking) / slice (host-only, a
    /// static EEVDF custom slice) / module (the pvsched guest module, with `dynamic`, with a
    /// base slice, with `deadline-aware`) / slice/vmm, module/vmm and daemon/vmm (QEMU's main
    /// thread on a custom slice too; daemon/vmm: the wake-up boosts over the vCPU threads'
    /// custom slice).
    LinuxTcg,
}

/// `pvsched bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// About two minutes: three rounds of 0.5 s cells.
    #[arg(long)]
    pub quick: bool,
    /// Rounds over the matrix (default 3).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Duration of each cell (default 5s, 0.5s with --quick).
    #[arg(long, value_parser = parse_duration)]
    pub cell_duration: Option<Duration>,
    /// Host load in busy cells.
    #[arg(long, value_enum, default_value_t = BenchLoadArg::Builtin)]
    pub host_load: BenchLoadArg,
    /// Output directory (default: pvsched-bench-<UTC date-time> in the current directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these policies, comma-separated (default: all; `none` is always run, it is the
    /// baseline every ratio is taken against): none, dynamic, deadline-aware,
    /// deadline-aware/nice (boosts paid back at nice 10, `repay=nice:10`, as the daemon does
    /// for `deadline-aware` instead of pausing), deadline-aware/slice,
    /// deadline-aware/nocap, deadline-aware/unpaid (boosts paid back only after a throttle),
    /// v3-default (its guest speaks the v3 page), static, daemon; any of them with driver
    /// options after `+`, to compare variants side by side:
    /// `deadline-aware,deadline-aware+repay=nice:19+lead=50us` (the `daemon`'s go to its
    /// driver, `dynamic`); `+engine=fifo|deadline` sets a column's engine thread's class.
    #[arg(long, value_delimiter = ',', value_parser = parse_bench_policy)]
    pub policies: Option<Vec<String>>,
    /// Only these probe intervals, comma-separated (default: 500us,1ms).
    #[arg(long, value_delimiter = ',', value_parser = parse_bench_interval)]
    pub intervals: Option<Vec<u64>>,
    /// The guest: the testbed, or a Linux guest under QEMU TCG (`linux-tcg`: 2 rounds of
    /// 10 s cyclictest cells, `--rounds` and `--cell-duration` apply; build it first with
    /// guest/linux/build.sh).
    #[arg(long, value_enum, default_value_t = BenchGuest::Testbed)]
    pub guest: BenchGuest,
    /// Where the Linux guest's vmlinuz and initramfs.gz are (`--guest linux-tcg`).
    #[arg(long, default_value = "target/linux-guest")]
    pub guest_dir: PathBuf,
    /// `--guest linux-tcg`: a driver option (key=value, repeatable) of the daemon in the
    /// `daemon` and `module` columns (driver `dynamic`), e.g. `rt_budget=5ms`.
    #[arg(long = "daemon-opt", value_name = "KEY=VALUE")]
    pub daemon_opts: Vec<String>,
    /// Testbed: where every cell's vCPU threads and built-in hogs may run (`free`, `apart`,
    /// `together`; see `pvsched vm --layout`). With `--host-load stress-ng` only the vCPU
    /// threads are placed.
    #[arg(long, default_value = "free")]
    pub layout: Layout,
    /// Testbed: the guest between timer events in every cell of the matrix: `busy` (the
    /// default; the floor cells still idle) or `idle` (it halts, so its vCPU threads sleep and
    /// wake like those of a mostly idle guest; the idle-host `none` cells are the floor).
    #[arg(long, value_enum, default_value_t = GuestLoadArg::Busy)]
    pub guest_load: GuestLoadArg,
    /// Run nothing: write the report of an earlier testbed run again from the `results.json`
    /// in this directory, with this build's tables (into `--out`, default that directory; the
    /// latency CDF plots are not redrawn).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["quick", "rounds", "cell_duration", "policies", "intervals", "daemon_opts"]
    )]
    pub report_from: Option<PathBuf>,
}

fn parse_bench_policy(s: &str) -> Result<String, String> {
    // `slice`, `module`, `module/slice`, `module/deadline`, `slice/vmm`, `module/vmm` and
    // `daemon/vmm` are columns of `--guest linux-tcg` only (checked against the guest there).
    if pvsched_bench::linux_tcg::tcg_only(s) {
        return Ok(s.to_string());
    }
    pvsched_bench::bench::check_policy(s)
        .map(|()| s.to_string())
        .map_err(|e| {
            format!(
                "{e} (`--guest linux-tcg`: slice, module, module/slice, module/deadline, \
                 slice/vmm, module/vmm, daemon/vmm)"
            )
        })
}

/// A probe interval in whole µs, 50 µs to 100 ms.
fn parse_bench_interval(s: &str) -> Result<u64, String> {
    let d = parse_duration(s)?;
    let us = d.as_micros();
    if d.subsec_nanos() % 1000 != 0 || !(50..=100_000).contains(&us) {
        return Err(format!(
            "interval `{s}`: a whole number of µs from 50us to 100ms"
        ));
    }
    Ok(us as u64)
}

/// Guest background load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestLoadArg {
    /// Halt between timer events.
    Idle,
    /// Stay runnable between timer events.
    Busy,
}

/// How the guest makes its pvsched requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestRequestsArg {
    /// Around its interrupts, softirqs, preempt-off sections and deadline-task jobs.
    Normal,
    /// Request a boost and never release it (no latency probe): shows the budgets.
    Rogue,
    /// Switch between an RT-task and an IRQ request every 2 ms, never releasing both (no
    /// latency probe): the budget dodge that debts close.
    Alternate,
}

/// The host-wide cap on boosted vCPU threads (`None`: no cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxBoosted(pub Option<usize>);

/// Parses `--max-boosted`.
pub fn parse_max_boosted(s: &str) -> Result<MaxBoosted, String> {
    match s {
        "auto" => Ok(MaxBoosted(Some(
            pvsched_host::runtime::default_max_boosted(),
        ))),
        "off" => Ok(MaxBoosted(None)),
        n => match n.parse::<usize>() {
            Ok(0) => Err("0 would never boost: give at least 1, auto or off".into()),
            Ok(n) => Ok(MaxBoosted(Some(n))),
            Err(_) => Err(format!("{n:?} is not a number, auto or off")),
        },
    }
}

/// When the dynamic drivers boost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BoostWhen {
    /// A vCPU only while it waits for a CPU when unboosted (run delay ≥ 20 % of a 25 ms
    /// window): a vCPU that never waits gains nothing from a boost, which costs system calls.
    Contended,
    /// Whenever the driver decides to, also on a quiet host.
    Always,
}

/// The protocol the VMM offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PvArg {
    /// No pvsched device.
    Off,
    /// pvsched protocol version 1.
    V1,
    /// The pvsched v3 shared page, ABI version 1 (docs/protocol-v3.md): the guest publishes
    /// task intent and critical sections; use with `--policy v3-default`.
    V3,
}

/// What the testbed guest says its busy loop is with `--pv v3`: `normal`, `batch`, or either
/// with a nice value (`batch:10`).
pub fn parse_v3_busy(s: &str) -> Result<pvsched_proto::v3::TaskDesc, String> {
    use pvsched_proto::v3::TaskDesc;
    let (class, nice) = match s.split_once(':') {
        Some((c, n)) => (
            c,
            n.parse::<i8>()
                .ok()
                .filter(|n| (-20..=19).contains(n))
                .ok_or_else(|| format!("invalid nice {n:?}: expected -20..19"))?,
        ),
        None => (s, 0),
    };
    match class {
        "normal" => Ok(TaskDesc::normal(nice)),
        "batch" => Ok(TaskDesc::batch(nice)),
        _ => Err(format!(
            "invalid guest task {s:?}: expected normal, batch, normal:<nice> or batch:<nice>"
        )),
    }
}

/// Fault the guest raises at start (for tests of error handling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultArg {
    /// `ud2`: invalid opcode.
    Ud,
    /// An instruction KVM's emulator cannot run (`popcnt`).
    Unsupported,
    /// Non-canonical load: general protection.
    Gp,
    /// Load from an unmapped address: page fault.
    Pf,
}

/// `pvsched vm` options.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Number of vCPUs (1-64), one host thread each (`pvsched-vcpu<N>`).
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Period of the guest's latency probe (TSC-deadline timer), e.g. 500us, 1ms.
    #[arg(long, default_value = "500us", value_parser = parse_duration)]
    pub interval: Duration,
    /// How long the guest runs, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Guest background load between timer events.
    #[arg(long, value_enum, default_value_t = GuestLoadArg::Idle)]
    pub guest_load: GuestLoadArg,
    /// How the guest makes its pvsched requests: normal, or a hostile pattern that shows
    /// what the budgets do (rogue, alternate).
    #[arg(long, value_enum, default_value_t = GuestRequestsArg::Normal)]
    pub guest_requests: GuestRequestsArg,
    /// Number of built-in CPU-hog threads on the host (SCHED_OTHER).
    #[arg(long, default_value_t = 0)]
    pub host_load: usize,
    /// Fixed scheduling class for every vCPU thread, restored at exit: other, fifo:<prio>,
    /// rr:<prio>. Without it the threads keep the class they are created with.
    #[arg(long)]
    pub vcpu_sched: Option<SchedClass>,
    /// Period of the guest's deadline task (e.g. 2ms, 4ms, 10ms), or `off`.
    #[arg(long, default_value = "2ms", value_parser = parse_task_period)]
    pub task_period: TaskPeriod,
    /// Work per deadline-task job, e.g. 250us.
    #[arg(long, default_value = "250us", value_parser = parse_duration)]
    pub task_work: Duration,
    /// Period of the host probe thread (defaults to --interval).
    #[arg(long, value_parser = parse_duration)]
    pub probe_interval: Option<Duration>,
    /// Policy driver deciding boosts during the run: none, static, dynamic, deadline-aware.
    #[arg(long, default_value = "none")]
    pub policy: String,
    /// Option of the policy driver, key=value (repeatable): class=fifo:10 (dynamic's
    /// class_task: slice:100us unless class is given), cs_budget=2ms,
    /// rt_budget=500ms, recovery=1, cooldown=1ms, repay=nice:5 (deadline-aware: pause:200us, the vCPU
    /// thread leaves the CPU at its exits while paying back; nice:<n>, slice:<d>, off),
    /// repay_on=throttle (deadline-aware: boost), irq_hold=200us, lead=50us (deadline-aware).
    #[arg(long = "policy-opt", value_name = "KEY=VALUE")]
    pub policy_opts: Vec<String>,
    /// When the dynamic drivers boost: `contended` (a vCPU only while it waits for a CPU when
    /// unboosted, from its run delay in /proc/<tid>/schedstat) or `always`.
    #[arg(long, value_enum, default_value_t = BoostWhen::Contended)]
    pub boost_when: BoostWhen,
    /// At most this many vCPU threads boosted at once (a boost over it waits, earliest
    /// deadline first): a number, `auto` (host CPUs − 1, at least 1) or `off`.
    #[arg(long, value_name = "N|auto|off", default_value = "auto", value_parser = parse_max_boosted)]
    pub max_boosted: MaxBoosted,
    /// How the engine thread outranks the vCPU threads it boosts: `fifo` (one FIFO priority
    /// above the boost class) or `deadline` (a SCHED_DEADLINE reservation of 300 µs per ms
    /// that may reclaim unused bandwidth: above every FIFO priority and outside real-time
    /// balancing, so its wake-ups do not get a boosted vCPU pushed onto another CPU; FIFO
    /// where the kernel refuses it). Measured: no gain over `fifo` here (README, "Where the
    /// engine thread runs").
    #[arg(long, value_name = "fifo|deadline", default_value = "fifo")]
    pub engine_class: pvsched_host::mechanism::EngineClass,
    /// Host-side events feeding the policy, from kernel tracepoints: `auto` (LAPIC timer
    /// expiries when the guest does not speak the protocol (`--pv off`) and the policy is
    /// `dynamic`; with the protocol the vCPU threads see the guest's requests themselves,
    /// and a wake-up of the engine per timer expiry would cost ~25 % of a core here),
    /// `none`, or a comma list of `timer` (hrtimer_expire_entry on apic_timer_fn), `wakeup`
    /// (kvm_vcpu_wakeup), `irq` (kvm_apic_accept_irq), `waking` (sched_waking).
    #[arg(long, default_value = "auto", value_parser = parse_host_events)]
    pub host_events: HostEvents,
    /// Keep guest RAM in this file (a shared mapping), so that `pvsched daemon` can read the
    /// guests' pvsched slots from it.
    #[arg(long)]
    pub memory_file: Option<PathBuf>,
    /// Offer the pvsched protocol to the guest (`v1`), have the guest speak the pvsched v3
    /// page (`v3`), or neither (`off`).
    #[arg(long, value_enum, default_value_t = PvArg::V1)]
    pub pv: PvArg,
    /// With `--pv v3`: what the guest publishes for its busy loop: `normal`, `batch`, or
    /// either with a nice (`batch:10` asks to be deboosted to nice 10).
    #[arg(long, default_value = "normal", value_parser = parse_v3_busy)]
    pub v3_busy: pvsched_proto::v3::TaskDesc,
    /// Where the vCPU threads and the built-in hogs may run: `free` (where the kernel puts
    /// them), `apart` (vCPU i and hog i pinned to CPU i: each vCPU beside one hog) or
    /// `together` (the vCPUs pinned to one CPU, the hogs to the others).
    #[arg(long, default_value = "free")]
    pub layout: Layout,
    /// Also write the full report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Make the guest fault at start (testing aid).
    #[arg(long, value_enum, hide = true)]
    pub inject_fault: Option<FaultArg>,
}

/// `--host-events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEvents {
    /// Timer expiries for `dynamic`, none otherwise.
    Auto,
    /// Exactly these tracepoints (all false: none).
    Set(TraceConfig),
}

fn parse_host_events(s: &str) -> Result<HostEvents, String> {
    match s {
        "auto" => Ok(HostEvents::Auto),
        "none" => Ok(HostEvents::Set(TraceConfig::none())),
        _ => TraceConfig::from_names(s.split(','))
            .map(HostEvents::Set)
            .map_err(|e| format!("{e}, auto or none")),
    }
}

/// `--task-period`: a duration or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskPeriod {
    /// No deadline task.
    Off,
    /// The task's period.
    Every(Duration),
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500us, 2ms, 10s)"))
}

fn parse_task_period(s: &str) -> Result<TaskPeriod, String> {
    if s == "off" {
        Ok(TaskPeriod::Off)
    } else {
        parse_duration(s).map(TaskPeriod::Every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_accept_common_units() {
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("2ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_task_period("off").unwrap(), TaskPeriod::Off);
    }

    #[test]
    fn bench_takes_a_subset_of_policies_and_intervals() {
        let cli = Cli::try_parse_from([
            "pvsched",
            "bench",
            "--policies",
            "daemon,deadline-aware/slice",
            "--intervals",
            "500us,2ms",
        ])
        .unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("bench")
        };
        assert_eq!(
            b.policies.unwrap(),
            vec!["daemon".to_string(), "deadline-aware/slice".to_string()]
        );
        assert_eq!(b.intervals.unwrap(), vec![500, 2000]);
        for bad in [
            ["--policies", "fast"],
            ["--intervals", "10us"],
            ["--intervals", "1500ns"],
            ["--intervals", "1s"],
        ] {
            let e = Cli::try_parse_from(["pvsched", "bench", bad[0], bad[1]]).unwrap_err();
            assert!(e.to_string().contains(bad[1]), "{e}");
        }
    }

    #[test]
    fn vm_defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["pvsched", "vm"]).unwrap();
        let Command::Vm(a) = cli.command else {
            panic!("vm")
        };
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.interval, Duration::from_micros(500));
        assert_eq!(a.task_period, TaskPeriod::Every(Duration::from_millis(2)));
        assert_eq!(a.guest_load, GuestLoadArg::Idle);
        assert!(a.vcpu_sched.is_none());
    }

    #[test]
    fn bench_defaults() {
        let cli = Cli::try_parse_from(["pvsched", "bench", "--quick"]).unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("bench")
        };
        assert!(b.quick && b.rounds.is_none() && b.out.is_none());
        assert_eq!(b.host_load, BenchLoadArg::Builtin);
        assert_eq!(b.policies, None);
        assert_eq!(b.intervals, None);
    }

    #[test]
    fn host_events_parse() {
        assert_eq!(parse_host_events("auto").unwrap(), HostEvents::Auto);
        let HostEvents::Set(c) = parse_host_events("timer,wakeup").unwrap() else {
            panic!()
        };
        assert!(c.timer_expiry && c.wakeup && !c.accept_irq);
        let HostEvents::Set(n) = parse_host_events("none").unwrap() else {
            panic!()
        };
        assert!(!n.any());
        let HostEvents::Set(w) = parse_host_events("waking").unwrap() else {
            panic!()
        };
        assert!(w.waking && !w.timer_expiry && w.any());
        let e = parse_host_events("timer,kvm_exit").unwrap_err();
        assert!(e.contains("\"kvm_exit\"") && e.contains("waking"), "{e}");
    }

    #[test]
    fn bad_sched_class_is_a_usage_error() {
        let e = Cli::try_parse_from(["pvsched", "vm", "--vcpu-sched", "fifo:0"]).unwrap_err();
        assert!(e.to_string().contains("fifo:<1-99>"), "{e}");
    }
}
