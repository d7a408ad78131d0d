//! Planner speed on a 256-CPU node: 4 packages x 32 cores x 2 threads, 8 NUMA nodes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use htex_rs::api::planner::{plan, Strategy, Topology};

fn bench(c: &mut Criterion) {
    let topo = Topology::synthetic(4, 32, 2, 2);
    assert_eq!(topo.cpus.len(), 256);
    let allowed: Vec<u32> = topo.cpus.keys().copied().collect();
    let accs: Vec<String> = (0..64).map(|i| i.to_string()).collect();
    for (name, strategy) in [
        ("block", Strategy::Block),
        ("alternating", Strategy::Alternating),
        ("topology", Strategy::Topology),
    ] {
        c.bench_function(&format!("plan_256cpu_64workers_{name}"), |b| {
            b.iter(|| plan(black_box(&strategy), &allowed, &topo, 64, &accs, Some(8)).unwrap());
        });
    }
    let list = (0..64)
        .map(|i| format!("{}-{}", 4 * i, 4 * i + 3))
        .collect::<Vec<_>>()
        .join(":");
    let value = format!("list:{list}");
    c.bench_function("parse_list_64_ranks", |b| {
        b.iter(|| Strategy::parse(black_box(&value)).unwrap());
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
