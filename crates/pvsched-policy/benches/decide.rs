//! Cost of one policy decision: `Engine::handle` for typical events (goal: well under 1 µs).

use criterion::{criterion_group, criterion_main, Criterion};
use pvsched_policy::{DriverOptions, Engine, Event, VcpuEvent, VcpuKey};
use pvsched_proto::abi::Reason;
use pvsched_proto::Reasons;
use std::hint::black_box;

fn engine(driver: &str, vcpus: u32) -> Engine {
    let mut e = Engine::default();
    e.add_vm(0, driver, &DriverOptions::new()).unwrap();
    let mut out = Vec::new();
    for v in 0..vcpus {
        e.handle(
            Event::new(VcpuKey::new(0, v), VcpuEvent::Registered),
            0,
            &mut out,
        );
    }
    e
}

fn bench(c: &mut Criterion) {
    let rt = Reasons::NONE.with(Reason::RtTask);
    for driver in ["dynamic", "deadline-aware", "static", "none"] {
        let mut e = engine(driver, 8);
        let mut out = Vec::with_capacity(16);
        let mut now = 1_000u64;
        let mut i = 0u32;
        c.bench_function(&format!("{driver}: request/release pair"), |b| {
            b.iter(|| {
                let key = VcpuKey::new(0, i % 8);
                i = i.wrapping_add(1);
                now += 10_000;
                out.clear();
                e.handle(Event::new(key, VcpuEvent::Doorbell(rt)), now, &mut out);
                e.handle(
                    Event::new(key, VcpuEvent::Doorbell(Reasons::NONE)),
                    now + 5_000,
                    &mut out,
                );
                black_box(out.len())
            })
        });
    }
    let mut e = engine("deadline-aware", 8);
    let mut out = Vec::with_capacity(16);
    let mut now = 1_000u64;
    c.bench_function("deadline-aware: deadline hint", |b| {
        b.iter(|| {
            now += 10_000;
            out.clear();
            e.handle(
                Event::new(
                    VcpuKey::new(0, 3),
                    VcpuEvent::DeadlineHint(Some(now + 500_000)),
                ),
                now,
                &mut out,
            );
            black_box(out.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
