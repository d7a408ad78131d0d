//! Scale: the interchange with 10 and with 1,000 simulated worker pools (real DEALER
//! sockets over loopback TCP, each registering, heartbeating and echoing its tasks),
//! same total capacity. Prints throughput, per-task latency and the interchange's
//! memory for each, and the 1,000/10 throughput ratio.
//!
//!     cargo bench --bench scale            (HTEX_RS_SCALE_TASKS=200000 to change N)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use htex_rs::interchange::{Config, Event, Handle, NewTask};
use htex_rs::protocol::{
    decode_meta, encode_meta, header, Kind, Registration, PROTOCOL_VERSION, STATUS_RESULT,
};

const THREADS: usize = 4;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// `pools` fake pools spread over a few threads; each echoes every task batch.
fn start_pools(
    port: u16,
    pools: usize,
    capacity: u32,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let ctx = zmq::Context::new();
                let socks: Vec<zmq::Socket> = (t..pools)
                    .step_by(THREADS)
                    .map(|i| {
                        let s = ctx.socket(zmq::DEALER).unwrap();
                        s.set_linger(0).unwrap();
                        let uid = format!("pool-{i}");
                        s.set_identity(uid.as_bytes()).unwrap();
                        s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
                        let reg = Registration {
                            protocol_version: PROTOCOL_VERSION,
                            uid,
                            block_id: Some((i % 64).to_string()),
                            worker_count: capacity,
                            max_capacity: capacity,
                            ..Registration::default()
                        };
                        s.send_multipart(
                            [
                                &header(Kind::Register)[..],
                                &serde_json::to_vec(&reg).unwrap(),
                            ],
                            0,
                        )
                        .unwrap();
                        s
                    })
                    .collect();
                let mut last_beat = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if last_beat.elapsed() > Duration::from_secs(1) {
                        for s in &socks {
                            let _ = s.send(&header(Kind::Heartbeat)[..], 0);
                        }
                        last_beat = Instant::now();
                    }
                    let mut items: Vec<zmq::PollItem> =
                        socks.iter().map(|s| s.as_poll_item(zmq::POLLIN)).collect();
                    if zmq::poll(&mut items, 50).unwrap_or(0) == 0 {
                        continue;
                    }
                    let ready: Vec<usize> = items
                        .iter()
                        .enumerate()
                        .filter(|(_, i)| i.is_readable())
                        .map(|(n, _)| n)
                        .collect();
                    for n in ready {
                        while let Ok(frames) = socks[n].recv_multipart(zmq::DONTWAIT) {
                            if frames[0] != header(Kind::Tasks) {
                                continue;
                            }
                            let meta = decode_meta(&frames[1], frames.len() - 2).unwrap();
                            let out: Vec<(u64, u8)> =
                                meta.iter().map(|(id, _)| (*id, STATUS_RESULT)).collect();
                            let mut msg = vec![header(Kind::Results).to_vec(), encode_meta(&out)];
                            msg.extend(frames.into_iter().skip(2));
                            let _ = socks[n].send_multipart(msg, 0);
                        }
                    }
                }
            })
        })
        .collect()
}

struct Figures {
    throughput: f64,
    latency_us: f64,
    rss_mib: f64,
}

fn run(pools: usize, total_capacity: u32, tasks: u64) -> Figures {
    let before = rss_kib();
    let h = Handle::start(Config {
        heartbeat_threshold: Duration::from_secs(30),
        ..Config::default()
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_pools(h.port, pools, (total_capacity / pools as u32).max(1), &stop);
    // Wait for every registration.
    loop {
        let (tx, rx) = std::sync::mpsc::channel();
        h.command(htex_rs::interchange::Command::Managers(tx));
        if rx.recv().unwrap().len() == pools {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wait = |n: u64| {
        let mut got = 0;
        while got < n {
            got += h
                .wait_events(Duration::from_secs(10), usize::MAX)
                .into_iter()
                .filter(|e| matches!(e, Event::Result { .. }))
                .count() as u64;
        }
    };
    let start = Instant::now();
    h.submit((1..=tasks).map(|i| NewTask {
        task_id: i,
        priority: f64::INFINITY,
        flags: 0,
        payload: vec![0; 100],
    }));
    wait(tasks);
    let throughput = tasks as f64 / start.elapsed().as_secs_f64();
    let rss_mib = (rss_kib().saturating_sub(before)) as f64 / 1024.0;
    let mut lat = Vec::new();
    for i in 0..500 {
        let t = Instant::now();
        h.submit([NewTask {
            task_id: tasks + 1 + i,
            priority: 0.0,
            flags: 0,
            payload: vec![0; 100],
        }]);
        wait(1);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    Figures {
        throughput,
        latency_us: lat[lat.len() / 2],
        rss_mib,
    }
}

/// 1,000 pools in one process need ~4 fds each (TCP both ends, ZMQ mailboxes).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

fn main() {
    raise_fd_limit();
    // `cargo test --benches` passes --bench-less args; keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let tasks: u64 = std::env::var("HTEX_RS_SCALE_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 5_000 } else { 200_000 });
    let capacity = 2000;
    let small = run(10, capacity, tasks);
    let large = run(1000, capacity, tasks);
    println!("pools  throughput/s  median latency us  interchange+pools RSS growth MiB");
    for (n, f) in [(10, &small), (1000, &large)] {
        println!(
            "{n:>5}  {:>12.0}  {:>17.0}  {:>8.1}",
            f.throughput, f.latency_us, f.rss_mib
        );
    }
    println!(
        "1000-pool throughput / 10-pool throughput: {:.2}",
        large.throughput / small.throughput
    );
}
