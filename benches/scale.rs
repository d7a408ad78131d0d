//! Scale: the interchange with 10, 1,000 and 10,000 simulated worker pools (real DEALER
//! sockets over loopback TCP, each registering, heartbeating and echoing its tasks;
//! Aurora has 10,624 nodes). The pools run in a child process (this binary re-executed),
//! so the RSS figure is the interchange's alone. Two comparisons:
//!
//! * same pools: every pool has the same capacity (8, a node of 8 workers), so 1,000
//!   pools are 100x the capacity of 10 and every message carries up to 8 tasks in each:
//!   does the interchange slow down as managers are added?
//! * same total capacity (2,000): 1,000 pools of 2 against 10 of 200, so the 1,000-pool
//!   run moves 100x more messages for the same tasks: the per-message cost.
//!
//! Prints throughput, one-at-a-time latency, interchange CPU per task, interchange RSS
//! growth (and per registered pool), and how long the storm of registrations took to
//! be admitted (all pools connect and register at once).
//!
//!     cargo bench --bench scale            (1,000,000 tasks; HTEX_RS_SCALE_TASKS to change N)
//!
//! The simulated pools are plain TCP sockets speaking ZMTP 3.0 as DEALERs (`zmtp.rs`),
//! one epoll per thread: the interchange cannot tell them from libzmq DEALERs, and they
//! cost the 2 shared cores about half of what libzmq DEALERs did (0.8 vs 2.1 us per task
//! at 10 pools, 1.9 vs 3.9 at 10,000). `HTEX_RS_SCALE_SIM=zmq` runs libzmq DEALERs instead.
//! `HTEX_RS_SCALE_SIM_THREADS=4` spreads each process of simulated pools over 4 threads
//! (default 1, the cheapest; docs/benchmarks.md, session 12, compares them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use htex_rs::api::interchange::{Config, Event, Handle, NewTask};
use htex_rs::api::protocol::{header, Kind};

mod common;
#[path = "common/floor.rs"]
mod floor;
#[path = "common/zmtp.rs"]
mod zmtp;

/// Threads per process of simulated pools: one thread and one libzmq context per
/// process is the cheapest simulator (CPU per task 2.2-2.5 us at 10 pools, 4.1-4.9 at
/// 10,000, against 3.2-3.7 and 5.5-6.9 with 4 threads), and it shares the 2 cores with
/// the interchange it measures.
const THREADS: usize = 1;
/// How often each simulated pool heartbeats (Parsl's default heartbeat_period).
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(30);
/// Simulated pools per child process: all of them in one process (one thread, one epoll)
/// at every size, so the 10,000-pool run has the same simulator as the 10-pool run, unless
/// the fd limit (two a pool leaves room for the libzmq simulator's mailboxes) is lower.
/// `HTEX_RS_SCALE_PER_PROCESS` sets it (sessions 8-14 ran 2,500 a process: the 10,000-pool
/// run had 4 simulator processes, woken one at a time, against the 10-pool run's one).
fn pools_per_process() -> usize {
    if let Some(n) = std::env::var("HTEX_RS_SCALE_PER_PROCESS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a local struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    usize::try_from(lim.rlim_cur.saturating_sub(128) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

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

/// Threads per process of simulated pools (`HTEX_RS_SCALE_SIM_THREADS`, else `THREADS`).
fn sim_threads() -> usize {
    std::env::var("HTEX_RS_SCALE_SIM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(THREADS)
}

/// One libzmq context (one I/O thread) for a whole process of simulated pools, with room
/// for all their sockets: the zmq crate cannot raise libzmq's 1,023 sockets per context,
/// and a context per 500 sockets (4 threads a process) gave the 10,000-pool run 20 I/O
/// threads against the 10-pool run's 4, so the simulator's own thread switching grew
/// with the pool count.
struct SimContext(*mut std::ffi::c_void);

// SAFETY: a libzmq context is thread-safe; each socket made from it stays on one thread.
unsafe impl Send for SimContext {}
// SAFETY: as above.
unsafe impl Sync for SimContext {}

impl SimContext {
    fn new(sockets: usize) -> Self {
        // SAFETY: plain libzmq calls; the context lives until drop.
        unsafe {
            let ctx = zmq_sys::zmq_ctx_new();
            assert!(!ctx.is_null(), "zmq_ctx_new");
            let max = i32::try_from(sockets + 64).unwrap();
            assert_eq!(
                zmq_sys::zmq_ctx_set(ctx, i32::try_from(zmq_sys::ZMQ_MAX_SOCKETS).unwrap(), max),
                0
            );
            SimContext(ctx)
        }
    }

    fn socket(&self) -> zmq::Socket {
        // SAFETY: the context is live; the socket is closed by its own drop, before the
        // context is terminated (every thread is joined first).
        unsafe {
            let s = zmq_sys::zmq_socket(self.0, i32::try_from(zmq_sys::ZMQ_DEALER).unwrap());
            assert!(!s.is_null(), "zmq_socket");
            zmq::Socket::from_raw(s)
        }
    }
}

impl Drop for SimContext {
    fn drop(&mut self) {
        // SAFETY: every socket of this context is closed (their threads were joined).
        unsafe { zmq_sys::zmq_ctx_term(self.0) };
    }
}

/// Child process: fake pools `first..first + count` until stdin closes (the parent
/// exited or is done).
fn fake_pools_main(spec: &str) {
    let v: Vec<usize> = spec.split(',').map(|x| x.parse().unwrap()).collect();
    let (port, first, count, capacity) = (u16::try_from(v[0]).unwrap(), v[1], v[2], v[3] as u32);
    let stop = Arc::new(AtomicBool::new(false));
    // Kept here until every thread is joined (see SimContext's drop).
    let ctx = libzmq_simulator().then(|| Arc::new(SimContext::new(count)));
    let threads = match &ctx {
        Some(ctx) => start_pools(port, first..first + count, capacity, &stop, ctx),
        None => start_tcp_pools(port, first..first + count, capacity, &stop),
    };
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

/// Run `body` on `sim_threads()` threads, each given its share of the pool numbers.
fn on_threads(
    pools: std::ops::Range<usize>,
    body: impl Fn(Vec<usize>) + Send + Sync + 'static,
) -> Vec<std::thread::JoinHandle<()>> {
    let threads = sim_threads();
    let body = Arc::new(body);
    (0..threads)
        .map(|t| {
            let body = body.clone();
            let mine: Vec<usize> = (pools.start + t..pools.end).step_by(threads).collect();
            std::thread::spawn(move || body(mine))
        })
        .collect()
}

/// An epoll watching `fds` for input, each event carrying its fd's index in `fds`.
fn epoll_over(fds: impl Iterator<Item = i32>) -> i32 {
    // SAFETY: plain epoll calls on open fds owned by the caller.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    for (n, fd) in fds.enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: n as u64,
        };
        // SAFETY: ep and fd are open; ev lives across the call.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &raw mut ev) },
            0
        );
    }
    ep
}

/// `HTEX_RS_SCALE_SIM=zmq`: simulated pools are libzmq DEALERs (the default is plain TCP
/// sockets speaking ZMTP, `zmtp.rs`).
fn libzmq_simulator() -> bool {
    std::env::var("HTEX_RS_SCALE_SIM").is_ok_and(|v| v == "zmq")
}

/// Fake pools (numbered `pools`) as plain TCP connections speaking ZMTP, spread over a
/// few threads, each thread one epoll; each echoes every task batch.
fn start_tcp_pools(
    port: u16,
    pools: std::ops::Range<usize>,
    capacity: u32,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let stop = stop.clone();
    on_threads(pools, move |mine| {
        let mut peers: Vec<zmtp::Peer> = mine
            .into_iter()
            .map(|i| {
                let uid = format!("pool-{i}");
                let reg = common::registration(&uid, &(i % 64).to_string(), capacity);
                zmtp::Peer::connect(port, uid.as_bytes(), &reg)
            })
            .collect();
        let ep = epoll_over(peers.iter().map(zmtp::Peer::fd));
        let echo = |frames: Vec<Vec<u8>>, out: &mut Vec<u8>| {
            if let Some((_, msg)) = common::echo(frames) {
                zmtp::put_message(out, &msg);
            }
        };
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut scratch = vec![0u8; 65_536];
        let mut last_beat = Instant::now();
        // Peers holding bytes their socket would not take yet.
        let mut pending: Vec<usize> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if last_beat.elapsed() > HEARTBEAT_PERIOD {
                // Heartbeats every 30 s (Parsl's heartbeat_period).
                last_beat = Instant::now();
                for (n, p) in peers.iter_mut().enumerate() {
                    zmtp::put_message(&mut p.outbuf, &[&header(Kind::Heartbeat)[..]]);
                    pending.push(n);
                }
            }
            pending.retain(|&n| {
                peers[n].flush();
                !peers[n].outbuf.is_empty()
            });
            let wait_ms = if pending.is_empty() { 50 } else { 1 };
            // SAFETY: events has room for 256 entries.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, wait_ms) };
            for e in events.iter().take(usize::try_from(n).unwrap_or(0)) {
                let n = e.u64 as usize;
                let p = &mut peers[n];
                if !p.read(&mut scratch, echo) {
                    // SAFETY: as above; a closed peer leaves the epoll set.
                    unsafe {
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, p.fd(), std::ptr::null_mut())
                    };
                } else if !p.outbuf.is_empty() && !pending.contains(&n) {
                    pending.push(n);
                }
            }
        }
        // SAFETY: ep is ours.
        unsafe { libc::close(ep) };
    })
}

/// Fake pools (numbered `pools`) as libzmq DEALERs spread over a few threads; each
/// echoes every task batch.
fn start_pools(
    port: u16,
    pools: std::ops::Range<usize>,
    capacity: u32,
    stop: &Arc<AtomicBool>,
    ctx: &Arc<SimContext>,
) -> Vec<std::thread::JoinHandle<()>> {
    let stop = stop.clone();
    let ctx = ctx.clone();
    on_threads(pools, move |mine| {
        let socks: Vec<zmq::Socket> = mine
            .into_iter()
            .map(|i| {
                common::register_socket(
                    ctx.socket(),
                    port,
                    &format!("pool-{i}"),
                    &(i % 64).to_string(),
                    capacity,
                )
            })
            .collect();
        // epoll over each socket's ZMQ_FD: a wake-up costs O(ready sockets), not
        // O(sockets), so the simulator does not drown the interchange it measures.
        let ep = epoll_over(socks.iter().map(|s| s.get_fd().unwrap()));
        let echo = |s: &zmq::Socket| {
            // ZMQ_FD is edge-like: drain until ZMQ_EVENTS says nothing is left.
            while s.get_events().is_ok_and(|e| e.contains(zmq::POLLIN)) {
                while let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
                    if let Some((_, msg)) = common::echo(frames) {
                        let _ = s.send_multipart(msg, 0);
                    }
                }
            }
        };
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut last_beat = Instant::now();
        let mut last_sweep = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if last_sweep.elapsed() > Duration::from_secs(1) {
                // Heartbeats every 30 s (Parsl's heartbeat_period): at 10,000 pools a
                // 1 s period would be 10,000 messages a second of their own.
                let beat = last_beat.elapsed() > HEARTBEAT_PERIOD;
                for s in &socks {
                    if beat {
                        let _ = s.send(&header(Kind::Heartbeat)[..], 0);
                    }
                    echo(s); // a sweep for any edge missed
                }
                if beat {
                    last_beat = Instant::now();
                }
                last_sweep = Instant::now();
            }
            // SAFETY: events has room for 256 entries.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, 50) };
            for e in events.iter().take(usize::try_from(n).unwrap_or(0)) {
                echo(&socks[e.u64 as usize]);
            }
        }
        // SAFETY: ep is ours.
        unsafe { libc::close(ep) };
    })
}

struct Figures {
    throughput: f64,
    latency_us: f64,
    rss_mib: f64,
    /// RSS growth from registering the pools, per pool (before any task).
    rss_per_pool_kib: f64,
    /// From starting the pools' process to every registration admitted.
    admit_s: f64,
    /// CPU of this process (interchange thread + its ZMQ I/O thread) per task.
    ix_cpu_us: f64,
    /// CPU of the simulated pools' process per task: it shares the 2 cores.
    sim_cpu_us: f64,
}

/// utime + stime of process `pid`, in seconds.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.iter().sum::<f64>() / hz
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a local struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Start the processes of simulated pools for `pools` pools on `port`.
fn spawn_pools(port: u16, pools: usize, capacity: u32) -> Vec<std::process::Child> {
    let per_process = pools_per_process();
    (0..pools)
        .step_by(per_process)
        .map(|first| {
            let count = per_process.min(pools - first);
            std::process::Command::new(std::env::current_exe().unwrap())
                .env(
                    "HTEX_RS_SCALE_CHILD",
                    format!("{port},{first},{count},{capacity}"),
                )
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("re-executing the bench for the fake pools")
        })
        .collect()
}

/// A process of simulated pools that ended early fails the run.
fn check_children(children: &mut [std::process::Child]) {
    for child in children {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("a process of simulated pools ended early ({status})");
        }
    }
}

/// utime + stime of the simulated pools' processes, in seconds.
fn sim_cpu(children: &[std::process::Child]) -> f64 {
    children.iter().map(|c| proc_cpu_seconds(c.id())).sum()
}

/// The throughput phase's clock: wall time, this process's CPU and the simulators'.
struct Phase {
    start: Instant,
    cpu0: f64,
    sim0: f64,
}

impl Phase {
    fn start(children: &[std::process::Child]) -> Phase {
        Phase {
            start: Instant::now(),
            cpu0: cpu_seconds(),
            sim0: sim_cpu(children),
        }
    }

    /// Tasks a second, and the interchange's and the simulators' CPU per task (us).
    fn end(&self, tasks: u64, children: &[std::process::Child]) -> (f64, f64, f64) {
        (
            tasks as f64 / self.start.elapsed().as_secs_f64(),
            (cpu_seconds() - self.cpu0) / tasks as f64 * 1e6,
            (sim_cpu(children) - self.sim0) / tasks as f64 * 1e6,
        )
    }
}

/// Latency samples (us) to a median.
fn median_of(mut lat: Vec<f64>) -> f64 {
    lat.sort_by(f64::total_cmp);
    lat[lat.len() / 2]
}

/// [`run`] against the floor router (`floor.rs`) instead of the interchange.
fn run_floor(pools: usize, capacity: u32, tasks: u64) -> Figures {
    let before = rss_kib();
    let mut ix = floor::Floor::bind(capacity);
    let spawned = Instant::now();
    let mut children = spawn_pools(ix.port, pools, capacity);
    while ix.registered < pools {
        ix.turn(20);
        assert!(
            spawned.elapsed() < Duration::from_secs(300),
            "not every registration was admitted"
        );
        check_children(&mut children);
    }
    let admit_s = spawned.elapsed().as_secs_f64();
    let rss_per_pool_kib = rss_kib().saturating_sub(before) as f64 / pools as f64;
    let phase = Phase::start(&children);
    ix.start(tasks);
    while ix.results < tasks {
        ix.turn(50);
    }
    let (throughput, ix_cpu_us, sim_cpu_us) = phase.end(tasks, &children);
    let rss_mib = (rss_kib().saturating_sub(before)) as f64 / 1024.0;
    let mut lat = Vec::new();
    for i in 0..500 {
        let t = Instant::now();
        let want = ix.results + 1;
        ix.one(i % pools);
        while ix.results < want {
            ix.turn(50);
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for child in &mut children {
        drop(child.stdin.take()); // EOF: the fake pools stop
    }
    for mut child in children {
        child.wait().unwrap();
    }
    drop(ix);
    Figures {
        throughput,
        latency_us: median_of(lat),
        rss_mib,
        rss_per_pool_kib,
        admit_s,
        ix_cpu_us,
        sim_cpu_us,
    }
}

fn run(pools: usize, capacity: u32, tasks: u64) -> Figures {
    if std::env::var("HTEX_RS_SCALE_IX").is_ok_and(|v| v == "floor") {
        return run_floor(pools, capacity, tasks);
    }
    let before = rss_kib();
    let h = Handle::start(Config {
        heartbeat_threshold: Duration::from_secs(120), // Parsl's default
        ..Config::default()
    })
    .unwrap();
    let spawned = Instant::now();
    let mut children = spawn_pools(h.port, pools, capacity);
    // Wait for every registration.
    loop {
        let (tx, rx) = std::sync::mpsc::channel();
        h.command(htex_rs::api::interchange::Command::Managers(tx));
        if rx.recv().unwrap().len() == pools {
            break;
        }
        assert!(
            spawned.elapsed() < Duration::from_secs(300),
            "not every registration was admitted"
        );
        check_children(&mut children);
        std::thread::sleep(Duration::from_millis(20));
    }
    let admit_s = spawned.elapsed().as_secs_f64();
    let rss_per_pool_kib = rss_kib().saturating_sub(before) as f64 / pools as f64;
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
    let phase = Phase::start(&children);
    h.submit((1..=tasks).map(|i| NewTask::plain(i, f64::INFINITY, 0, vec![0; 100].into())));
    wait(tasks);
    let (throughput, ix_cpu_us, sim_cpu_us) = phase.end(tasks, &children);
    let rss_mib = (rss_kib().saturating_sub(before)) as f64 / 1024.0;
    let mut lat = Vec::new();
    for i in 0..500 {
        let t = Instant::now();
        h.submit([NewTask::plain(tasks + 1 + i, 0.0, 0, vec![0; 100].into())]);
        wait(1);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    for child in &mut children {
        drop(child.stdin.take()); // EOF: the fake pools stop
    }
    for mut child in children {
        child.wait().unwrap();
    }
    h.stop();
    // Hand freed memory back so the next run's RSS growth is its own.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    Figures {
        throughput,
        latency_us: lat[lat.len() / 2],
        rss_mib,
        rss_per_pool_kib,
        admit_s,
        ix_cpu_us,
        sim_cpu_us,
    }
}

/// 10,000 pools in one process need ~3 fds each (TCP, the socket's ZMQ mailbox);
/// the interchange one per pool. Raise the hard limit too where allowed (root).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            let want = lim.rlim_max.max(65536);
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) != 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
            }
        }
    }
}

fn main() {
    raise_fd_limit();
    if let Ok(spec) = std::env::var("HTEX_RS_SCALE_CHILD") {
        fake_pools_main(&spec);
        return;
    }
    // `cargo test --benches` passes --bench-less args; keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let tasks: u64 = std::env::var("HTEX_RS_SCALE_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 5_000 } else { 1_000_000 });
    // HTEX_RS_SCALE_ONLY=pools,capacity: one run (for profiling).
    if let Ok(only) = std::env::var("HTEX_RS_SCALE_ONLY") {
        let v: Vec<u32> = only.split(',').map(|x| x.parse().unwrap()).collect();
        let f = run(v[0] as usize, v[1], tasks);
        println!(
            "{} pools of {}: {:.0} tasks/s, {:.0} us, {:.1} MiB ({:.1} KiB per registered pool), admitted in {:.2} s, IX {:.2} us/task, sim {:.2} us/task",
            v[0], v[1], f.throughput, f.latency_us, f.rss_mib, f.rss_per_pool_kib, f.admit_s, f.ix_cpu_us, f.sim_cpu_us
        );
        return;
    }
    // Interleaved rounds, medians: this machine's speed drifts between runs.
    let rounds = if quick { 1 } else { 5 };
    let configs: [(&str, usize, u32); 5] = [
        ("same pools (cap 8)", 10, 8),
        ("same pools (cap 8)", 1000, 8),
        ("same pools (cap 8)", if quick { 2000 } else { 10_000 }, 8),
        ("same total (2,000)", 10, 200),
        ("same total (2,000)", 1000, 2),
    ];
    let mut got: Vec<Vec<Figures>> = configs.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (_, pools, cap)) in configs.iter().enumerate() {
            got[i].push(run(*pools, *cap, tasks));
        }
    }
    let median = |v: &[Figures], f: fn(&Figures) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    println!(
        "{:<22}{:>6}  {:>10}  {:>9}  {:>10}  {:>12}  {:>9}  {:>9}  {:>13}   ({rounds} rounds, medians)",
        "comparison",
        "pools",
        "tasks/s",
        "median us",
        "IX RSS MiB",
        "KiB per pool",
        "admit s",
        "IX us/task",
        "sim us/task"
    );
    let mut tput = Vec::new();
    for ((name, pools, _), v) in configs.iter().zip(&got) {
        let t = median(v, |f| f.throughput);
        tput.push(t);
        println!(
            "{name:<22}{pools:>6}  {t:>10.0}  {:>9.0}  {:>10.1}  {:>12.1}  {:>9.2}  {:>9.2}  {:>13.2}",
            median(v, |f| f.latency_us),
            median(v, |f| f.rss_mib),
            median(v, |f| f.rss_per_pool_kib),
            median(v, |f| f.admit_s),
            median(v, |f| f.ix_cpu_us),
            median(v, |f| f.sim_cpu_us)
        );
    }
    println!(
        "throughput over the 10-pool run's (of medians): same pools 1,000: {:.2}, {}: {:.2}; same total capacity 1,000: {:.2}",
        tput[1] / tput[0],
        configs[2].1,
        tput[2] / tput[0],
        tput[4] / tput[3]
    );
    // The same ratios within each round (the runs back to back), and their medians.
    for (name, big) in [("1000/10", 1), ("10000/10", 2)] {
        let mut per_round: Vec<f64> = got[big]
            .iter()
            .zip(&got[0])
            .map(|(a, b)| a.throughput / b.throughput)
            .collect();
        let shown: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
        per_round.sort_by(f64::total_cmp);
        println!(
            "same pools {name} per round: {} (median {:.2})",
            shown.join(", "),
            per_round[per_round.len() / 2]
        );
    }
}
