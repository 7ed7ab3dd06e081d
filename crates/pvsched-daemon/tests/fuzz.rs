//! Fuzz targets, one per parser of untrusted input: a guest's slot (`slot_decode`), the
//! configuration file (`config_toml`), a ctl request line (`ctl_request`), a QMP peer's lines
//! (`qmp_reply`), the state file (`state_file`) and driver options (`policy_options`, which
//! ctl and the configuration forward).
//!
//! Each target runs proptest cases drawn from arbitrary bytes, printable text, soups of the
//! format's tokens, and valid seeds (inline below) with random edits: byte overwrites,
//! insertions and deletions, splices, and replacements of a number by an edge value or of a
//! word by a token of the format. A case fails when the parser panics, breaks an invariant of
//! its result, or holds more memory at once than a bound linear in the input's length
//! (counted by this binary's global allocator, per thread). A failure is shrunk and printed
//! with its input and the seed that replays the run.
//!
//! CI runs [`DEFAULT_CASES`] per target; a long local run (the README has it):
//!
//! ```text
//! PVSCHED_FUZZ_CASES=10000000 cargo test --release -p pvsched-daemon --test fuzz -- --nocapture --test-threads=1
//! ```
//!
//! `PVSCHED_FUZZ_SEED=<n>` fixes the random seed (a failure names the one it ran with).

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestCaseError, TestError, TestRunner};
use pvsched_daemon::daemon::{authorize, parse_ctl, CtlRequest, Peer};
use pvsched_daemon::{config, qmp, state};
use pvsched_policy::options::{parse_class, parse_duration};
use pvsched_policy::{DriverOptions, Registry};
use pvsched_proto::abi::{feature, hint_kind, off, Reason, Reasons, SLOT_SIZE};
use pvsched_proto::host::MAX_REPORTED_DEPTH;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt;
use std::io::{BufReader, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Allocation accounting

/// Cases per target when `PVSCHED_FUZZ_CASES` is not set: what CI runs (release build, a few
/// seconds for the whole binary; a debug build is an order of magnitude slower, so it runs
/// fewer).
const DEFAULT_CASES: u32 = if cfg!(debug_assertions) {
    10_000
} else {
    100_000
};

/// The bound on what one parse may hold at once: `per_byte` bytes per input byte plus
/// [`ALLOC_BASE`], with `per_byte` by format.
///
/// Why linear: every parser here builds at most a tree of its input, each node made of at
/// least one or two input bytes (`0,`), in `Vec`s that grow by doubling (up to twice what they
/// need), plus a few copies of the text (a lossy `String`, a QMP line). An allocation sized by
/// a *value* in the input (a length field, a count) instead of by its length breaks the bound
/// at once. The factors are about 1.4 to 2 times the worst measured by
/// `dense_and_deep_inputs_stay_within_the_bound` on the densest inputs we know:
/// - JSON (QMP replies, the state file): 50 bytes per byte for `[0,0,...]` (serde_json's
///   32-byte `Value` per 2 input bytes, with `Vec` doubling);
/// - TOML (the configuration): 135 bytes per byte for `a = [0,0,...]` and 133 for many
///   `[[vm]]` tables (toml keeps spanned tokens and values while it deserializes);
/// - ctl lines and driver options: 12 bytes per byte for `a a a ...` (a 16-byte `&str` per
///   2-byte word, with `Vec` doubling).
fn linear_bound(per_byte: usize, len: usize) -> usize {
    per_byte.saturating_mul(len).saturating_add(ALLOC_BASE)
}

/// Bytes per input byte a JSON parse may hold (see [`linear_bound`]).
const JSON_PER_BYTE: usize = 72;
/// Bytes per input byte a TOML parse may hold (see [`linear_bound`]).
const TOML_PER_BYTE: usize = 192;
/// Bytes per input byte a ctl line or option list may hold (see [`linear_bound`]).
const WORDS_PER_BYTE: usize = 24;
/// Fixed costs of a parse: the 8 KiB `BufReader`, error messages, the driver registry.
const ALLOC_BASE: usize = 64 << 10;

/// Wraps [`System`] and counts, per thread, the bytes allocated and not yet freed, and their
/// peak since [`measure`] last reset it. Memory freed by another thread than the one that
/// allocated it is taken off the freeing thread (saturating at 0): the fuzz targets are single
/// threaded, so their measurements are exact.
struct Counting;

thread_local! {
    // Const-initialized `Cell`s of a type without `Drop`: accessing them never allocates and
    // never registers a destructor, so the allocator can use them.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    let _ = CURRENT.try_with(|c| {
        let now = c.get().saturating_add(n);
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrank(n: usize) {
    let _ = CURRENT.try_with(|c| c.set(c.get().saturating_sub(n)));
}

// SAFETY: every method forwards to `System` with the arguments it got, so `Counting` upholds
// `GlobalAlloc`'s contract exactly as `System` does; the bookkeeping around the calls neither
// allocates nor unwinds (thread-local `Cell`s, saturating arithmetic).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: our caller guarantees `layout` has a non-zero size, as `System.alloc` needs.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: our caller guarantees `ptr` was allocated by this allocator (so by `System`)
        // with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: our caller guarantees `ptr` was allocated by `System` with `layout` and that
        // `new_size` is non-zero and does not overflow when rounded up to the alignment.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as a copy (new block, then the old one freed): the peak is an upper
            // bound whether or not the block moved.
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the most bytes it held allocated at once on this thread (above what
/// the thread held when it started).
fn measure(f: impl FnOnce()) -> usize {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get).saturating_sub(base)
}

// ---------------------------------------------------------------------------------------------
// The runner

/// Bytes, shown as an escaped byte string (what a failure prints).
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

fn cases() -> u32 {
    match std::env::var("PVSCHED_FUZZ_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("PVSCHED_FUZZ_CASES={v:?} is not a number of cases")),
        Err(_) => DEFAULT_CASES,
    }
}

fn seed() -> u64 {
    match std::env::var("PVSCHED_FUZZ_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("PVSCHED_FUZZ_SEED={v:?} is not a u64")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_secs() ^ u64::from(t.subsec_nanos()).rotate_left(32)
        }
    }
}

/// Runs `cases` cases of `target` on inputs from `strategy`; a case fails when the target
/// panics or holds more than `bound(input)` bytes at once. Returns the throughput, or the
/// failure with its (shrunk) input.
fn run<S>(
    name: &str,
    cases: u32,
    strategy: S,
    bound: impl Fn(&S::Value) -> usize,
    target: impl Fn(&S::Value),
) -> Result<f64, String>
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let seed = seed();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::XorShift,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let accepted_before = ACCEPTED.with(Cell::get);
    let start = Instant::now();
    let result = runner.run(&strategy, |input| {
        let peak = catch_unwind(AssertUnwindSafe(|| measure(|| target(&input)))).map_err(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(not a string)".into());
            TestCaseError::fail(format!("panicked: {msg}"))
        })?;
        let limit = bound(&input);
        if peak > limit {
            return Err(TestCaseError::fail(format!(
                "held {peak} bytes allocated at once, over the bound of {limit}"
            )));
        }
        Ok(())
    });
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            let rate = f64::from(cases) / secs.max(1e-9);
            let accepted = ACCEPTED.with(Cell::get) - accepted_before;
            let pct = 100.0 * accepted as f64 / f64::from(cases.max(1));
            let _ = writeln!(
                std::io::stderr(),
                "fuzz {name}: {cases} cases in {secs:.1} s, {rate:.0} cases/s, {pct:.1} % \
                 accepted (PVSCHED_FUZZ_SEED={seed})"
            );
            Ok(rate)
        }
        Err(TestError::Fail(why, input)) => Err(format!(
            "fuzz target {name} failed (PVSCHED_FUZZ_SEED={seed}): {why}\nminimal input: {input:?}"
        )),
        Err(TestError::Abort(why)) => Err(format!(
            "fuzz target {name} aborted (PVSCHED_FUZZ_SEED={seed}): {why}"
        )),
    }
}

fn fuzz<S>(name: &str, strategy: S, bound: impl Fn(&S::Value) -> usize, target: impl Fn(&S::Value))
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    if let Err(e) = run(name, cases(), strategy, bound, target) {
        panic!("{e}");
    }
}

thread_local! {
    static ACCEPTED: Cell<u64> = const { Cell::new(0) };
}

/// Counts a case whose input the parser accepted (how far past the syntax checks the inputs
/// reach).
fn accept() {
    ACCEPTED.with(|a| a.set(a.get() + 1));
}

/// Writes an error and its sources where nothing is kept (formatting them must not panic
/// either; `io::sink` does not allocate).
fn format_chain(e: &dyn std::error::Error) {
    let mut sink = std::io::sink();
    let mut cur = Some(e);
    while let Some(e) = cur {
        let _ = write!(sink, "{e}");
        cur = e.source();
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs: arbitrary bytes, token soups and edited seeds

/// One random edit of a seed. Positions are taken modulo the length at the time.
#[derive(Clone, Debug)]
enum Edit {
    Overwrite {
        at: usize,
        byte: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Replaces `cut` bytes at `at` with a token of the format.
    Token {
        at: usize,
        cut: usize,
        token: usize,
    },
    /// Inserts a part of a seed (the same or another).
    Splice {
        at: usize,
        seed: usize,
        from: usize,
        len: usize,
    },
    /// Replaces the `nth` number (digits, with a sign) with one of [`NUMBERS`].
    Number {
        nth: usize,
        number: usize,
    },
    /// Replaces the `nth` word (letters, digits, `_`, `-`) with a token of the format.
    Word {
        nth: usize,
        token: usize,
    },
}

/// Numbers at the edges of the types the parsers read them into.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "64",
    "65",
    "255",
    "256",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-0",
    "1.5",
    "1e3",
    "1e400",
    "0x10",
    "007",
    "1_000",
];

/// The span of the `nth` (modulo their number) maximal run of bytes that `is_part` accepts.
fn nth_run(b: &[u8], nth: usize, is_part: impl Fn(u8) -> bool) -> Option<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if is_part(b[i]) {
            let start = i;
            while i < b.len() && is_part(b[i]) {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    (!runs.is_empty()).then(|| runs[nth % runs.len()])
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Overwrite { at, byte }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        2 => (any::<usize>(), 1..64usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        4 => (any::<usize>(), 0..8usize, any::<usize>())
            .prop_map(|(at, cut, token)| Edit::Token { at, cut, token }),
        1 => (any::<usize>(), any::<usize>(), any::<usize>(), 1..256usize)
            .prop_map(|(at, seed, from, len)| Edit::Splice { at, seed, from, len }),
        3 => (any::<usize>(), any::<usize>()).prop_map(|(nth, number)| Edit::Number { nth, number }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(nth, token)| Edit::Word { nth, token }),
    ]
}

fn apply(seed: &[u8], edits: &[Edit], seeds: &[Vec<u8>], dict: &[&str]) -> Vec<u8> {
    fn put(b: &mut Vec<u8>, at: usize, cut: usize, part: &[u8]) {
        let i = at % (b.len() + 1);
        let j = i.saturating_add(cut).min(b.len());
        b.splice(i..j, part.iter().copied());
    }
    let mut b = seed.to_vec();
    for e in edits {
        match e {
            Edit::Overwrite { at, byte } => {
                if !b.is_empty() {
                    let i = at % b.len();
                    b[i] = *byte;
                }
            }
            Edit::Insert { at, bytes } => put(&mut b, *at, 0, bytes),
            Edit::Delete { at, len } => put(&mut b, *at, *len, &[]),
            Edit::Token { at, cut, token } => {
                if !dict.is_empty() {
                    put(&mut b, *at, *cut, dict[token % dict.len()].as_bytes());
                }
            }
            Edit::Splice {
                at,
                seed,
                from,
                len,
            } => {
                if !seeds.is_empty() {
                    let s = &seeds[seed % seeds.len()];
                    let f = from % (s.len() + 1);
                    let part = s[f..f.saturating_add(*len).min(s.len())].to_vec();
                    put(&mut b, *at, 0, &part);
                }
            }
            Edit::Number { nth, number } => {
                if let Some((i, j)) = nth_run(&b, *nth, |c| c.is_ascii_digit() || c == b'-') {
                    b.splice(i..j, NUMBERS[number % NUMBERS.len()].bytes());
                }
            }
            Edit::Word { nth, token } => {
                let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
                if let (false, Some((i, j))) = (dict.is_empty(), nth_run(&b, *nth, word)) {
                    b.splice(i..j, dict[token % dict.len()].bytes());
                }
            }
        }
    }
    b
}

/// Seeds with random edits.
fn edited(seeds: Vec<Vec<u8>>, dict: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let all = Arc::new(seeds.clone());
    (select(seeds), prop::collection::vec(edit(), 0..8))
        .prop_map(move |(s, e)| apply(&s, &e, &all, dict))
}

/// Inputs of a text format: arbitrary bytes, printable text, token soups, edited seeds.
fn text_input(
    seeds: &[&str],
    dict: &'static [&'static str],
    max_len: usize,
) -> impl Strategy<Value = Bytes> {
    let seeds: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    let printable = prop_oneof![20 => 0x20u8..0x7f, 1 => Just(b'\n'), 1 => Just(b'\t')];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..max_len),
        1 => prop::collection::vec(printable, 0..max_len),
        2 => prop::collection::vec(select(dict), 0..48).prop_map(|t| t.concat().into_bytes()),
        6 => edited(seeds, dict),
    ]
    .prop_map(Bytes)
}

// ---------------------------------------------------------------------------------------------
// slot_decode: a guest's slot (hostile guest memory)

/// A slot's guest half: (seq, request, depth, deadline_tsc, hint_vcpu, hint_kind).
type GuestHalf = (u32, u32, [u8; 8], u64, u32, u32);

/// Valid slots.
const SLOTS: &[GuestHalf] = &[
    (0, 0, [0; 8], 0, 0, 0),
    (7, 0b01001, [1, 0, 0, 2, 0, 0, 0, 0], 0, 0, 0),
    (8, 0b10000, [0, 0, 0, 0, 3, 0, 0, 0], 123_456_789, 0, 0),
    (
        9,
        0b00100,
        [0, 0, 1, 0, 0, 0, 0, 0],
        0,
        2,
        hint_kind::LOCK_HOLDER,
    ),
    (
        10,
        0b11111,
        [1, 1, 1, 1, 1, 0, 0, 0],
        u64::MAX,
        1,
        hint_kind::IPI_TARGET,
    ),
];

fn slot_bytes((seq, request, depth, deadline, hint_vcpu, hint_kind): GuestHalf) -> Vec<u8> {
    let mut b = vec![0u8; SLOT_SIZE];
    b[off::SEQ..off::SEQ + 4].copy_from_slice(&seq.to_le_bytes());
    b[off::REQUEST..off::REQUEST + 4].copy_from_slice(&request.to_le_bytes());
    b[off::DEPTH..off::DEPTH + 8].copy_from_slice(&depth);
    b[off::DEADLINE_TSC..off::DEADLINE_TSC + 8].copy_from_slice(&deadline.to_le_bytes());
    b[off::HINT_VCPU..off::HINT_VCPU + 4].copy_from_slice(&hint_vcpu.to_le_bytes());
    b[off::HINT_KIND..off::HINT_KIND + 4].copy_from_slice(&hint_kind.to_le_bytes());
    b
}

fn slot_input() -> impl Strategy<Value = (Bytes, u32, u32)> {
    let seeds: Vec<Vec<u8>> = SLOTS.iter().copied().map(slot_bytes).collect();
    let fields = (
        any::<u32>(),
        prop_oneof![0u32..0x40, any::<u32>()],
        prop_oneof![any::<[u8; 8]>(), Just([MAX_REPORTED_DEPTH + 1; 8])],
        prop_oneof![Just(0u64), any::<u64>()],
        prop_oneof![0u32..10, any::<u32>(), Just(u32::MAX)],
        prop_oneof![0u32..4, any::<u32>()],
    )
        .prop_map(slot_bytes);
    let bytes = prop_oneof![
        2 => any::<[u64; 16]>().prop_map(|w| w.iter().flat_map(|x| x.to_le_bytes()).collect()),
        1 => prop::collection::vec(any::<u8>(), 0..=2 * SLOT_SIZE),
        3 => fields,
        // Edited seeds, mostly brought back to a slot's size (shorter ones are only `Short`).
        4 => (edited(seeds, &[]), prop::bool::weighted(0.8)).prop_map(|(mut b, resize)| {
            if resize {
                b.resize(SLOT_SIZE, 0);
            }
            b
        }),
    ];
    let vcpus = prop_oneof![0u32..=8, any::<u32>(), Just(u32::MAX)];
    let features = prop_oneof![0u32..=feature::ALL_V1, any::<u32>()];
    (bytes.prop_map(Bytes), vcpus, features)
}

#[test]
fn slot_decode() {
    // The decoder is `no_std` without `alloc`: it may not allocate at all, error messages
    // included.
    fuzz(
        "slot_decode",
        slot_input(),
        |_| 0,
        |(b, vcpus, features)| {
            let b = &b.0;
            match pvsched_proto::decode(b, *vcpus, *features) {
                Ok(s) => {
                    accept();
                    assert!(b.len() >= SLOT_SIZE, "decoded a short slot");
                    assert_eq!(s.seq.to_le_bytes(), b[off::SEQ..off::SEQ + 4]);
                    assert_eq!(s.reasons.bits() & !Reasons::KNOWN_BITS, 0);
                    for r in Reason::ALL {
                        assert!(s.depth[r.index()] <= MAX_REPORTED_DEPTH);
                    }
                    if s.deadline_tsc.is_some() {
                        assert_ne!(features & feature::DEADLINE_HINT, 0);
                    }
                    if let Some(h) = s.hint {
                        assert_ne!(features & feature::VCPU_HINT, 0);
                        assert!(h.vcpu < *vcpus, "hint {} of {vcpus} vCPUs", h.vcpu);
                    }
                }
                Err(e) => format_chain(&e),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// config_toml: the configuration file

const CONFIGS: &[&str] = &[
    include_str!("../../../contrib/pvsched.toml"),
    r#"[daemon]
socket = "/run/pvsched.sock"
state_file = "/run/pvsched.state"
metrics = "127.0.0.1:9477"
metrics_public = false
watch = true
host_events = ["timer", "wakeup", "irq"]
boost_when = "always"
allow_uids = [0, 1000]
allow_gids = [107]
ctl_group = 10

[policy]
driver = "deadline-aware"
options = { cs_budget = "2ms", rt_budget = "500ms", recovery = "1", class = "fifo:10", lead = "50us" }

[[vm]]
pid = 1234
guest_memory = "/run/vm.mem"
slots = [0x200800, 0x210800]
features = ["deadline_hint", "vcpu_hint"]
tsc_offset = -6912

[[vm]]
qmp = "/run/qemu-vm1.qmp"

[[vm]]
tids = [4711, 4712]
"#,
    "[policy]\ndriver = \"static\"\n[policy.options]\nclass = \"deadline:500us/2ms\"\n",
    "[daemon]\nmetrics = \"[::1]:9477\"\nboost_when = \"contended\"\nmax_boosted = 3\n",
    "",
];

const TOML_DICT: &[&str] = &[
    "[daemon]\n",
    "[policy]\n",
    "[[vm]]\n",
    "[policy.options]\n",
    "[vm]\n",
    "socket",
    "state_file",
    "metrics",
    "metrics_public",
    "watch",
    "host_events",
    "boost_when",
    "allow_uids",
    "allow_gids",
    "ctl_group",
    "driver",
    "options",
    "pid",
    "qmp",
    "tids",
    "guest_memory",
    "slots",
    "tsc_offset",
    "features",
    "max_boosted",
    "\"deadline_hint\"",
    " = ",
    "=",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "\r\n",
    "#",
    " ",
    "\\",
    "\\u0000",
    "\\UFFFFFFFF",
    "\\x",
    "0x",
    "0o",
    "0b",
    "_",
    "-",
    "+",
    "1e308",
    "1e999",
    "nan",
    "-inf",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "4294967296",
    "-1",
    "0",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "1979-05-27",
    "\"timer\"",
    "\"irq\"",
    "\"always\"",
    "\"127.0.0.1:9477\"",
    "\"fifo:99\"",
    "\"deadline:500us/2ms\"",
    "\"3ms\"",
    "\"18446744073709551615s\"",
    "\"1:0\"",
    "\"0.001\"",
    "\u{feff}",
    "\u{0}",
    "é",
];

#[test]
fn config_toml() {
    fuzz(
        "config_toml",
        text_input(CONFIGS, TOML_DICT, 1024),
        |b| linear_bound(TOML_PER_BYTE, b.0.len()),
        |b| {
            let text = String::from_utf8_lossy(&b.0);
            match config::parse(&text, Path::new("fuzz.toml")) {
                Ok(c) => {
                    accept();
                    for vm in &c.vms {
                        if let pvsched_daemon::VmSource::Tids(t) = &vm.source {
                            assert!(!t.is_empty(), "a VM without threads");
                        }
                    }
                }
                Err(e) => format_chain(&e),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// ctl_request: a ctl request line (any local user may connect; root-only changes)

const CTL_LINES: &[&str] = &[
    "status",
    "status\n",
    "enable",
    "enable 3",
    "disable",
    "disable 0",
    "driver 1 dynamic cs_budget=3ms rt_budget=500ms class=rr:7 recovery=1:1 cooldown=100ms",
    "driver 4294967295 deadline-aware lead=50us class_deadline=deadline:500us/2ms",
    "driver 0 static class=nice:-5",
    "driver 2 none",
    "driver 3 dynamic repay=slice:100us irq_hold=200us class_cs=fifo:98 class_task=rr:1",
];

const CTL_DICT: &[&str] = &[
    "status",
    "enable",
    "disable",
    "driver",
    " ",
    "\t",
    "\n",
    "\r",
    "\u{a0}",
    "\u{3000}",
    "0",
    "1",
    "4294967295",
    "4294967296",
    "-1",
    "+1",
    "none",
    "static",
    "dynamic",
    "deadline-aware",
    "class=",
    "cs_budget=",
    "rt_budget=",
    "recovery=",
    "cooldown=",
    "irq_hold=",
    "lead=",
    "repay=",
    "class_cs=",
    "class_task=",
    "class_deadline=",
    "fifo:",
    "rr:",
    "nice:",
    "slice:",
    "deadline:",
    "/",
    "=",
    ":",
    ".",
    "ms",
    "us",
    "µs",
    "ns",
    "s",
    "99",
    "98",
    "-20",
    "19",
    "18446744073709551615",
    "off",
    "\u{0}",
    "\u{fffd}",
];

/// What the runtime does with a `driver` request: build the driver, and check the classes.
/// True when the driver was built.
fn build_driver(name: &str, opts: &DriverOptions) -> bool {
    for key in ["class", "class_cs", "class_task", "class_deadline", "repay"] {
        let _ = opts.get(key).and_then(parse_class);
    }
    match Registry::builtin().create(name, opts) {
        Ok(d) => {
            assert_eq!(d.name(), name);
            true
        }
        Err(e) => {
            format_chain(&e);
            false
        }
    }
}

#[test]
fn ctl_request() {
    let root = Peer {
        pid: 1,
        uid: 0,
        gid: 0,
    };
    let user = Peer {
        pid: 2,
        uid: 1000,
        gid: 100,
    };
    fuzz(
        "ctl_request",
        text_input(CTL_LINES, CTL_DICT, 512),
        |b| linear_bound(WORDS_PER_BYTE, b.0.len()),
        |b| {
            // As the daemon reads it: lossy UTF-8 (here with any newlines left in).
            let line = String::from_utf8_lossy(&b.0);
            let verb = line.split_whitespace().next();
            assert!(authorize(verb, root, None).is_ok());
            let _ = authorize(verb, user, Some(100));
            match parse_ctl(&line) {
                Ok(CtlRequest::Driver { vm: _, name, opts }) => {
                    assert!(!name.is_empty() && !name.contains(char::is_whitespace));
                    if build_driver(&name, &opts) {
                        accept();
                    }
                }
                Ok(_) => accept(),
                Err(e) => assert!(!e.is_empty()),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// qmp_reply: what a QMP peer (a QEMU process, which a guest may have taken over) sends

const QMP_GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \
     \"major\": 8}, \"package\": \"Debian 1:8.2.2\"}, \"capabilities\": [\"oob\"]}}\n";
const QMP_CPUS: &str = "{\"return\": [{\"thread-id\": 4711, \"props\": {\"core-id\": 0, \
     \"thread-id\": 0, \"node-id\": 0, \"socket-id\": 0}, \"qom-path\": \
     \"/machine/unattached/device[0]\", \"cpu-index\": 0, \"target\": \"x86_64\"}, \
     {\"thread-id\": 4712, \"props\": {\"core-id\": 0, \"thread-id\": 0, \"node-id\": 0, \
     \"socket-id\": 1}, \"qom-path\": \"/machine/unattached/device[1]\", \"cpu-index\": 1, \
     \"target\": \"x86_64\"}]}\n";
const QMP_EVENT: &str = "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \
     \"event\": \"RESUME\"}\n";

fn qmp_seeds() -> Vec<String> {
    vec![
        // A whole conversation, as query_cpus reads it.
        format!("{QMP_GREETING}{{\"return\": {{}}}}\n{QMP_CPUS}"),
        format!("{QMP_GREETING}{QMP_EVENT}{{\"return\": {{}}}}\n{QMP_EVENT}{QMP_CPUS}"),
        format!(
            "{QMP_GREETING}{{\"return\": {{}}}}\n{{\"error\": {{\"class\": \"CommandNotFound\", \
             \"desc\": \"The command query-cpus-fast has not been found\"}}}}\n"
        ),
        QMP_CPUS.to_string(),
        "{\"return\": [{\"cpu-index\": 4294967295, \"thread-id\": 2147483647}]}\n".to_string(),
    ]
}

const QMP_DICT: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\n",
    "\r\n",
    " ",
    "\"return\"",
    "\"error\"",
    "\"event\"",
    "\"QMP\"",
    "\"cpu-index\"",
    "\"thread-id\"",
    "\"qom-path\"",
    "\"props\"",
    "0",
    "1",
    "-1",
    "4294967296",
    "2147483648",
    "-2147483649",
    "18446744073709551616",
    "1e400",
    "1.5",
    "-0",
    "null",
    "true",
    "false",
    "\\u0000",
    "\\ud800",
    "\\\"",
    "[[[[[[[[",
    "]]]]]]]]",
    "{\"return\": ",
    "{\"error\": {}}\n",
    "{\"return\": {}}\n",
    "\u{fffd}",
    "\u{0}",
];

#[test]
fn qmp_reply() {
    let seeds = qmp_seeds();
    let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
    fuzz(
        "qmp_reply",
        text_input(&seeds, QMP_DICT, 1024),
        |b| linear_bound(JSON_PER_BYTE, b.0.len()),
        |b| {
            let b = &b.0;
            // One answer, skipping events.
            match qmp::read_reply(&mut BufReader::new(&b[..])) {
                Ok(v) => assert!(v.get("return").is_some() || v.get("error").is_some()),
                Err(e) => format_chain(&e),
            }
            // The whole conversation of query_cpus (what the daemon writes goes nowhere).
            match qmp::converse(&mut std::io::sink(), &mut BufReader::new(&b[..])) {
                Ok(threads) => {
                    accept();
                    assert!(threads.iter().all(|t| t.tid > 0));
                    assert!(threads.windows(2).all(|w| w[0].index <= w[1].index));
                }
                Err(e) => format_chain(&e),
            }
            // Every line that is JSON, as a query-cpus-fast answer.
            for line in b.split(|&c| c == b'\n') {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                    for ret in [&v, &v["return"]] {
                        if let Err(e) = qmp::parse_cpus(ret) {
                            format_chain(&e);
                        }
                    }
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// state_file: the state file (written by a daemon, read back after a crash)

const STATES: &[&str] = &[
    r#"[
  {
    "tid": 4711,
    "start_time": 123456,
    "original": {
      "policy": 0,
      "flags": 0,
      "nice": 0,
      "priority": 0,
      "runtime": 0,
      "deadline": 0,
      "period": 0
    }
  },
  {
    "tid": 4712,
    "start_time": 123457,
    "original": {
      "policy": 6,
      "flags": 1,
      "nice": -5,
      "priority": 0,
      "runtime": 500000,
      "deadline": 2000000,
      "period": 2000000
    }
  }
]"#,
    r#"[{"tid":1,"start_time":0,"original":{"policy":1,"flags":0,"nice":0,"priority":10,"runtime":0,"deadline":0,"period":0}}]"#,
    "[]",
];

const STATE_DICT: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\"",
    " ",
    "\n",
    "\"tid\"",
    "\"start_time\"",
    "\"original\"",
    "\"policy\"",
    "\"flags\"",
    "\"nice\"",
    "\"priority\"",
    "\"runtime\"",
    "\"deadline\"",
    "\"period\"",
    "0",
    "-1",
    "2147483648",
    "-2147483649",
    "4294967296",
    "18446744073709551616",
    "1e3",
    "1.0",
    "null",
    "true",
    "\\u0000",
    "[[[[[[[[",
    "{\"tid\":",
];

#[test]
fn state_file() {
    fuzz(
        "state_file",
        text_input(STATES, STATE_DICT, 512),
        |b| linear_bound(JSON_PER_BYTE, b.0.len()),
        |b| match state::parse_entries(&b.0) {
            Ok(entries) => {
                accept();
                // What parses is what a daemon writes: it reads back the same.
                let again = serde_json::to_vec(&entries).expect("entries serialize");
                assert_eq!(state::parse_entries(&again).expect("round trip"), entries);
            }
            Err(e) => format_chain(&e),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// policy_options: driver options (`ctl driver`, the configuration's [policy] options)

/// The keys the drivers know (from the policy crate, so none is missed) and some they do not.
fn option_keys() -> Vec<&'static str> {
    let mut keys = pvsched_policy::drivers::OPTION_KEYS.to_vec();
    keys.extend(["bogus", "", " class "]);
    keys
}

const OPTION_VALUES: &[&str] = &[
    "0ns",
    "1ns",
    "3ms",
    "500us",
    "500µs",
    "10s",
    "10001ms",
    "18446744073709551615ns",
    "18446744073709551615s",
    "18446744073709551616ns",
    "ms",
    "5",
    "fifo:1",
    "fifo:98",
    "fifo:99",
    "rr:0",
    "rr:4294967296",
    "nice:-20",
    "nice:19",
    "nice:20",
    "nice:-2147483649",
    "slice:100us",
    "slice:100ms",
    "slice:99us",
    "deadline:1024ns/100us",
    "deadline:1023ns/100us",
    "deadline:4s/4s",
    "deadline:5s/5s",
    "deadline:1ms",
    "deadline:/",
    "1",
    "0.1",
    "100",
    "100.001",
    "0.0999",
    "1:1",
    "0:1",
    "1:0",
    "3:2",
    ".5",
    "5.",
    ".",
    "+1",
    "1.+5",
    "1:1:1",
    "off",
    "",
    "=",
    ":",
    "/",
    "é",
    "\u{0}",
];

fn option_words() -> impl Strategy<Value = Vec<String>> {
    let keys = option_keys();
    let seeds: Vec<String> = keys
        .iter()
        .zip(OPTION_VALUES.iter().cycle())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
    let word = prop_oneof![
        3 => (select(keys), select(OPTION_VALUES)).prop_map(|(k, v)| format!("{k}={v}")),
        2 => text_input(&seeds, OPTION_VALUES, 48)
            .prop_map(|b| String::from_utf8_lossy(&b.0).into_owned()),
    ];
    prop::collection::vec(word, 0..8)
}

#[test]
fn policy_options() {
    fuzz(
        "policy_options",
        option_words(),
        |w| linear_bound(WORDS_PER_BYTE, w.iter().map(|s| s.len() + 1).sum()),
        |words| match DriverOptions::parse(words.iter().map(String::as_str)) {
            Ok(opts) => {
                let mut built = 0;
                for name in Registry::builtin().names() {
                    built += usize::from(build_driver(name, &opts));
                }
                if built > 0 {
                    accept();
                }
                for w in words {
                    let (k, v) = w.split_once('=').expect("accepted words are key=value");
                    assert!(opts.get(k.trim()).is_some(), "{k:?} missing");
                    let _ = parse_duration(v.trim());
                    let _ = parse_class(v.trim());
                }
            }
            Err(e) => format_chain(&e),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The seeds, the bound and the checker themselves

#[test]
fn seeds_are_valid() {
    for s in SLOTS.iter().copied().map(slot_bytes) {
        pvsched_proto::decode(&s, 4, feature::ALL_V1).unwrap();
    }
    for c in CONFIGS {
        config::parse(c, Path::new("seed.toml")).unwrap();
    }
    for l in CTL_LINES {
        parse_ctl(l).unwrap();
    }
    let seeds = qmp_seeds();
    assert_eq!(
        qmp::converse(&mut std::io::sink(), &mut seeds[0].as_bytes())
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        qmp::converse(&mut std::io::sink(), &mut seeds[1].as_bytes())
            .unwrap()
            .len(),
        2
    );
    assert!(qmp::converse(&mut std::io::sink(), &mut seeds[2].as_bytes()).is_err());
    for s in STATES {
        state::parse_entries(s.as_bytes()).unwrap();
    }
    let o = DriverOptions::parse(["cs_budget=3ms", "class=rr:7", "recovery=1:1"]).unwrap();
    Registry::builtin().create("dynamic", &o).unwrap();
}

/// The densest inputs known, large: their peak per input byte stays within their format's
/// factor (see [`linear_bound`]); deep nesting is refused, not a stack overflow.
#[test]
fn dense_and_deep_inputs_stay_within_the_bound() {
    fn qmp(b: &[u8]) {
        let _ = qmp::read_reply(&mut BufReader::new(b)).and_then(|v| qmp::parse_cpus(&v["return"]));
    }
    fn state(b: &[u8]) {
        let _ = state::parse_entries(b);
    }
    fn toml(b: &[u8]) {
        let _ = config::parse(std::str::from_utf8(b).unwrap(), Path::new("t"));
    }
    fn ctl(b: &[u8]) {
        let _ = parse_ctl(std::str::from_utf8(b).unwrap());
    }
    fn options(b: &[u8]) {
        let _ = DriverOptions::parse(std::str::from_utf8(b).unwrap().split(' '));
    }
    let n = 32 << 10;
    let zeros = format!("[{}0]", "0,".repeat(n));
    let objects = format!("[{}{{}}]", "{},".repeat(n));
    let cpus: Vec<String> = (0..n / 8)
        .map(|i| format!("{{\"cpu-index\":{i},\"thread-id\":{}}}", i + 1))
        .collect();
    let entries: Vec<String> = (0..n / 16)
        .map(|i| {
            format!(
                "{{\"tid\":{i},\"start_time\":0,\"original\":{{\"policy\":0,\"flags\":0,\
                 \"nice\":0,\"priority\":0,\"runtime\":0,\"deadline\":0,\"period\":0}}}}"
            )
        })
        .collect();
    let keys: String = (0..n / 4).map(|i| format!("{i}={i}\n")).collect();
    let inline: Vec<String> = (0..n / 4).map(|i| format!("k{i}=\"{i}\"")).collect();
    let words: String = (0..n / 4).map(|i| format!("{i}={i} ")).collect();
    type Case = (&'static str, usize, String, fn(&[u8]));
    let cases: Vec<Case> = vec![
        (
            "qmp zeros",
            JSON_PER_BYTE,
            format!("{{\"return\": {zeros}}}\n"),
            qmp,
        ),
        (
            "qmp objects",
            JSON_PER_BYTE,
            format!("{{\"return\": {objects}}}\n"),
            qmp,
        ),
        (
            "qmp cpus",
            JSON_PER_BYTE,
            format!("{{\"return\": [{}]}}\n", cpus.join(",")),
            qmp,
        ),
        (
            "qmp deep",
            JSON_PER_BYTE,
            format!("{}\n", "[".repeat(n)),
            qmp,
        ),
        ("state zeros", JSON_PER_BYTE, zeros.clone(), state),
        (
            "state entries",
            JSON_PER_BYTE,
            format!("[{}]", entries.join(",")),
            state,
        ),
        ("state deep", JSON_PER_BYTE, "[".repeat(n), state),
        (
            "toml zeros",
            TOML_PER_BYTE,
            format!("[daemon]\nallow_uids = {zeros}\n"),
            toml,
        ),
        (
            "toml objects",
            TOML_PER_BYTE,
            format!("a = {objects}\n"),
            toml,
        ),
        (
            "toml tables",
            TOML_PER_BYTE,
            "[[vm]]\npid=1\n".repeat(n / 4),
            toml,
        ),
        (
            "toml keys",
            TOML_PER_BYTE,
            format!("[policy.options]\n{keys}"),
            toml,
        ),
        (
            "toml inline",
            TOML_PER_BYTE,
            format!("[policy]\noptions = {{{}}}\n", inline.join(",")),
            toml,
        ),
        (
            "toml deep",
            TOML_PER_BYTE,
            format!("a = {}\n", "[".repeat(n)),
            toml,
        ),
        (
            "ctl words",
            WORDS_PER_BYTE,
            format!("driver 1 dynamic {}", "a=b ".repeat(n)),
            ctl,
        ),
        ("ctl spaces", WORDS_PER_BYTE, "a ".repeat(n), ctl),
        ("options", WORDS_PER_BYTE, words, options),
    ];
    for (name, per_byte, input, parse) in cases {
        let b = input.as_bytes();
        let peak = measure(|| parse(b));
        let _ = writeln!(
            std::io::stderr(),
            "{name}: {} input bytes, peak {peak} bytes ({:.1} per input byte)",
            b.len(),
            peak as f64 / b.len() as f64
        );
        assert!(
            peak <= linear_bound(per_byte, b.len()),
            "{name}: {peak} bytes for {} input bytes",
            b.len()
        );
    }
}

/// Negative control: the checker sees an allocation over the bound.
#[test]
fn negative_control_allocation_over_the_bound_is_reported() {
    let e = run(
        "control_alloc",
        10,
        any::<u8>(),
        |_| 4 << 20,
        |_| {
            let v = vec![1u8; 8 << 20];
            std::hint::black_box(&v);
        },
    )
    .unwrap_err();
    assert!(
        e.contains("held 8388608 bytes") && e.contains("bound of 4194304"),
        "{e}"
    );
    assert!(e.contains("minimal input: 0"), "shrunk input shown: {e}");
    // Freed memory is no longer held: allocating 1 MiB eight times in a row passes.
    run(
        "control_alloc_freed",
        10,
        any::<u8>(),
        |_| 2 << 20,
        |_| {
            for _ in 0..8 {
                std::hint::black_box(vec![1u8; 1 << 20]);
            }
        },
    )
    .unwrap();
}

/// Runs `f` with the panic messages of this thread (not others) kept quiet.
fn quiet_panics<R>(f: impl FnOnce() -> R) -> R {
    thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = f();
    QUIET.with(|q| q.set(false));
    r
}

/// Negative control: a panicking target is caught, shrunk and reported with its input.
#[test]
fn negative_control_panic_is_caught_and_reported() {
    let e = quiet_panics(|| {
        run(
            "control_panic",
            1000,
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes),
            |_| usize::MAX,
            |b| {
                if b.0.contains(&b'*') {
                    panic!("found a star");
                }
            },
        )
    })
    .unwrap_err();
    assert!(e.contains("panicked: found a star"), "{e}");
    assert!(
        e.contains("minimal input: b\"*\" (1 bytes)"),
        "shrunk input shown: {e}"
    );
}
