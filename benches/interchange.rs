//! Interchange round-trip latency and batched throughput, measured with an in-process
//! fake worker pool (a DEALER speaking the htex_rs protocol that echoes every task).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use htex_rs::api::interchange::{Config, Event, Handle, NewTask};

mod common;

/// Start an interchange plus an echoing pool thread with `capacity` slots.
fn setup(capacity: u32) -> (Handle, std::thread::JoinHandle<()>) {
    let h = Handle::start(Config {
        heartbeat_threshold: Duration::from_secs(600),
        ..Config::default()
    })
    .unwrap();
    let port = h.port;
    let pool = std::thread::spawn(move || {
        let ctx = zmq::Context::new();
        let s = common::register(&ctx, port, "bench-pool", "0", capacity);
        loop {
            let Ok(frames) = s.recv_multipart(0) else {
                return;
            };
            let Some((ids, msg)) = common::echo(frames) else {
                continue;
            };
            if ids.first() == Some(&u64::MAX) {
                return;
            }
            s.send_multipart(msg, 0).unwrap();
        }
    });
    (h, pool)
}

fn wait_results(h: &Handle, n: usize) {
    let mut got = 0;
    while got < n {
        for e in h.wait_events(Duration::from_secs(10), usize::MAX) {
            if let Event::Result { .. } = e {
                got += 1;
            }
        }
    }
}

fn stop(h: Handle, pool: std::thread::JoinHandle<()>) {
    h.submit([NewTask::plain(u64::MAX, 0.0, 0, bytes::Bytes::new())]);
    pool.join().unwrap();
    drop(h);
}

fn bench(c: &mut Criterion) {
    let (h, pool) = setup(1);
    // Warm-up outside the timer: TCP connect and registration.
    h.submit([NewTask::plain(0, 0.0, 0, vec![0; 64].into())]);
    wait_results(&h, 1);
    let mut id = 1u64;
    c.bench_function("round_trip_one_task", |b| {
        b.iter(|| {
            h.submit([NewTask::plain(id, 0.0, 0, vec![0; 64].into())]);
            id += 1;
            wait_results(&h, 1);
        });
    });
    stop(h, pool);

    let (h, pool) = setup(1024);
    h.submit([NewTask::plain(0, 0.0, 0, vec![0; 64].into())]);
    wait_results(&h, 1);
    let mut g = c.benchmark_group("batched");
    let n = 10_000u64;
    g.throughput(Throughput::Elements(n));
    let mut id = 1u64;
    g.bench_function("10k_tasks_capacity_1024", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                h.submit(
                    (0..n).map(|i| NewTask::plain(id + i, f64::INFINITY, 0, vec![0; 64].into())),
                );
                id += n;
                wait_results(&h, n as usize);
            }
            black_box(start.elapsed())
        });
    });
    g.finish();
    stop(h, pool);
}

criterion_group!(benches, bench);
criterion_main!(benches);
