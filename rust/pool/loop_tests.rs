//! The pool core end to end: a real core thread, a libzmq ROUTER as the interchange,
//! real Unix streams as workers.

use super::handle::Counts;
use super::*;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{decode_header, decode_meta, encode_meta, header, Kind, STATUS_WORKER_LOST};
use crate::stream::{self, Decoder};
use crate::transport::Signal;

use crate::protocol::{STATUS_EXCEPTION, STATUS_RESULT};

/// A fake interchange (ROUTER) and a core with one fake worker (a Unix stream),
/// real sockets.
struct Rig {
    _ctx: zmq::Context,
    ix: zmq::Socket,
    worker: FakeWorker,
    core: Handle,
    worker_addr: std::os::unix::net::SocketAddr,
    log: Arc<crate::logging::Sink>,
    events: Arc<Signal>,
}

struct FakeWorker {
    stream: UnixStream,
    decoder: Decoder,
    /// Tasks received and not yet taken by `next_task`, in order.
    pending: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl FakeWorker {
    fn send(&mut self, frames: &[&[u8]]) {
        use std::io::Write;
        self.stream
            .write_all(&stream::encode(frames).unwrap())
            .unwrap();
    }

    fn recv(&mut self) -> Vec<Vec<u8>> {
        stream::recv_message(&self.stream, &mut self.decoder)
    }
}

fn connect(addr: &std::os::unix::net::SocketAddr, rank: &[u8]) -> FakeWorker {
    let mut w = FakeWorker {
        stream: UnixStream::connect_addr(addr).unwrap(),
        decoder: Decoder::new(1 << 20),
        pending: std::collections::VecDeque::default(),
    };
    w.send(&[&header(Kind::Register), rank]);
    w
}

impl FakeWorker {
    /// The next task given to this worker, in order (a message may carry several):
    /// its id and payload.
    fn next_task(&mut self) -> (u64, Vec<u8>) {
        while self.pending.is_empty() {
            let m = self.recv();
            assert_eq!(decode_header(&m[0]), Ok(Kind::Tasks));
            self.take_tasks(m);
        }
        self.pending.pop_front().unwrap()
    }

    fn take_tasks(&mut self, m: Vec<Vec<u8>>) {
        let meta = decode_meta(&m[1], m.len() - 2).unwrap();
        assert!(!meta.is_empty(), "a task message carries tasks");
        let ids = meta.into_iter().map(|(id, _)| id);
        self.pending.extend(ids.zip(m.into_iter().skip(2)));
    }

    /// Tasks are taken in until a RECLAIM arrives; the ids of those not yet started.
    fn until_reclaim(&mut self) -> Vec<u64> {
        loop {
            let m = self.recv();
            match decode_header(&m[0]) {
                Ok(Kind::Reclaim) => return self.pending.drain(..).map(|t| t.0).collect(),
                Ok(Kind::Tasks) => self.take_tasks(m),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn finish(&mut self, id: u64, payload: &[u8]) {
        let meta = encode_meta(&[(id, STATUS_RESULT)]);
        self.send(&[&header(Kind::Results), &meta, payload]);
    }

    /// Nothing arrives within `ms`.
    fn assert_quiet(&mut self, ms: u64) {
        use std::io::Read;
        self.stream
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// Results forwarded to the interchange, in order, until `n` have arrived.
fn results(ix: &zmq::Socket, n: usize) -> Vec<(u64, u8, Vec<u8>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = recv_kind(ix, Kind::Results);
        let meta = decode_meta(&f[1], f.len() - 2).unwrap();
        out.extend(
            meta.into_iter()
                .zip(&f[2..])
                .map(|((t, s), p)| (t, s, p.clone())),
        );
    }
    out
}

fn rig(threshold: Duration) -> Rig {
    rig_ending(threshold, None)
}

/// A rig whose block ends at `block_end` (epoch seconds).
fn rig_ending(threshold: Duration, block_end: Option<f64>) -> Rig {
    let ctx = zmq::Context::new();
    let ix = ctx.socket(zmq::ROUTER).unwrap();
    ix.set_linger(0).unwrap();
    ix.bind("tcp://127.0.0.1:*").unwrap();
    let url = ix.get_last_endpoint().unwrap().unwrap();
    let name = format!(
        "htex-rs-core-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    );
    let events = Arc::new(Signal::new().unwrap());
    let log = crate::logging::Sink::queue(false, Some(events.clone()));
    let core = Handle::start(Config {
        interchange_url: url,
        identity: b"pool-1".to_vec(),
        worker_url: format!("@{name}"),
        max_message_bytes: 1 << 20,
        registration: b"{}".to_vec(),
        heartbeat_period: Duration::from_millis(50),
        heartbeat_threshold: threshold,
        hostname: "node-a".into(),
        curve: None,
        slots: Vec::new(),
        memory: 0,
        accelerators: Vec::new(),
        log: Some(log.clone()),
        events: events.clone(),
        block_end,
        drain_time: None,
    })
    .unwrap();
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()
    };
    let worker = connect(&addr, b"0");
    Rig {
        _ctx: ctx,
        ix,
        worker,
        core,
        worker_addr: addr,
        log,
        events,
    }
}

fn recv_kind(sock: &zmq::Socket, kind: Kind) -> Vec<Vec<u8>> {
    recv_kind_any(sock, &[kind])
}

/// The next message of one of `kinds` (from its header frame on); others are skipped.
fn recv_kind_any(sock: &zmq::Socket, kinds: &[Kind]) -> Vec<Vec<u8>> {
    loop {
        assert!(
            sock.poll(zmq::POLLIN, 5000).unwrap() > 0,
            "timed out waiting for {kinds:?}"
        );
        let frames = sock.recv_multipart(0).unwrap();
        let at = frames
            .iter()
            .position(|f| f.len() == 4 && f[..2] == *b"HX")
            .unwrap();
        if decode_header(&frames[at]).is_ok_and(|k| kinds.contains(&k)) {
            return frames[at..].to_vec();
        }
    }
}

fn send_tasks(r: &Rig, ids: &[u64]) {
    send_tasks_to(&r.ix, ids);
}

fn send_tasks_to(ix: &zmq::Socket, ids: &[u64]) {
    let meta = encode_meta(&ids.iter().map(|i| (*i, 0)).collect::<Vec<_>>());
    let mut frames = vec![b"pool-1".to_vec(), header(Kind::Tasks).to_vec(), meta];
    frames.extend(ids.iter().map(|i| i.to_le_bytes().to_vec()));
    ix.send_multipart(frames, 0).unwrap();
}

/// Wait until the core's counts satisfy `done` (the core publishes them as it goes).
fn wait_counts(core: &Handle, what: &str, done: impl Fn(&Counts) -> bool) -> Counts {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = core.counts();
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{c:?}: never {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_workers(core: &Handle, n: u64) {
    wait_counts(core, &format!("{n} workers"), |c| c.workers == n);
}

fn died(core: &Handle) {
    core.command(Command::WorkerDied {
        pid: std::process::id(),
        exit_code: -9,
    });
}

#[test]
fn registers_routes_tasks_and_forwards_results() {
    let mut r = rig(Duration::from_secs(30));
    let reg = recv_kind(&r.ix, Kind::Register);
    assert_eq!(reg[1], b"{}");
    send_tasks(&r, &[1, 2, 3]);
    // A fresh worker gets one task: no look-ahead until its tasks prove quick.
    assert_eq!(r.worker.next_task(), (1, 1u64.to_le_bytes().to_vec()));
    r.worker.assert_quiet(100);
    let meta = encode_meta(&[(1, STATUS_EXCEPTION)]);
    r.worker.send(&[&header(Kind::Results), &meta, b"r1"]);
    assert_eq!(
        results(&r.ix, 1),
        vec![(1, STATUS_EXCEPTION, b"r1".to_vec())]
    );
    assert_eq!(r.worker.next_task().0, 2);
    r.worker.finish(2, b"r2");
    assert_eq!(r.worker.next_task().0, 3);
    r.worker.finish(3, b"r3");
    assert_eq!(results(&r.ix, 2).len(), 2);
    let c = r.core.counts();
    assert_eq!((c.received, c.started, c.results, c.lost), (3, 3, 3, 0));
    assert_eq!(r.core.wait_stopped(Duration::from_millis(10)), None);
}

#[test]
fn a_look_ahead_behind_a_long_task_is_taken_back_for_the_idle_worker() {
    let mut r = rig(Duration::from_secs(30));
    recv_kind(&r.ix, Kind::Register);
    let mut second = connect(&r.worker_addr, b"1");
    wait_workers(&r.core, 2); // both registered before the tasks arrive
                              // One quick task each first, so both may get a look-ahead.
    send_tasks(&r, &[100, 101]);
    let w = r.worker.next_task().0;
    r.worker.finish(w, b"ok");
    let w = second.next_task().0;
    second.finish(w, b"ok");
    assert_eq!(results(&r.ix, 2).len(), 2);
    send_tasks(&r, &[1, 2, 3, 4, 5]);
    // Each gets a task, then the rest is shared as look-ahead: tasks 3 and 4 for the
    // first worker, which never finishes its task, 5 for the second.
    let a1 = r.worker.next_task().0;
    let mut done = vec![];
    while done.len() < 2 {
        let (id, _) = second.next_task();
        second.finish(id, b"ok");
        done.push(id);
    }
    // The second worker is idle with nothing queued: the core asks for the look-ahead.
    let back = r.worker.until_reclaim();
    assert_eq!(back.len(), 2, "the first worker's look-ahead");
    let meta: Vec<(u64, u8)> = back.iter().map(|id| (*id, 0)).collect();
    r.worker
        .send(&[&header(Kind::Returned), &encode_meta(&meta)]);
    for want in back {
        let (id, _) = second.next_task();
        assert_eq!(
            id, want,
            "the returned tasks run on the idle worker, in order"
        );
        second.finish(id, b"ok");
        done.push(id);
    }
    done.push(a1);
    done.sort_unstable();
    assert_eq!(done, vec![1, 2, 3, 4, 5]);
    assert_eq!(results(&r.ix, 4).len(), 4);
    assert_eq!(r.core.counts().requeued, 2);
    r.worker.assert_quiet(100);
}

#[test]
fn a_dead_worker_loses_only_its_running_task_and_the_queue_goes_on() {
    let r = rig(Duration::from_secs(30));
    let Rig {
        ix,
        mut worker,
        core,
        worker_addr,
        ..
    } = r;
    recv_kind(&ix, Kind::Register);
    send_tasks_to(&ix, &[1, 2, 3, 4]);
    assert_eq!(worker.next_task().0, 1);
    drop(worker); // killed while running task 1

    // Its replacement registers under the same rank before the death is reported:
    // a new worker, not the dead one (the reuse race of issue #6).
    let mut next = connect(&worker_addr, b"0");
    wait_workers(&core, 2);
    died(&core);
    let lost = results(&ix, 1);
    assert_eq!((lost[0].0, lost[0].1), (1, STATUS_WORKER_LOST));
    let doc: serde_json::Value = serde_json::from_slice(&lost[0].2).unwrap();
    assert_eq!(doc["worker_id"], "0");
    assert_eq!(doc["hostname"], "node-a");
    assert_eq!(doc["exit_code"], -9);
    for want in 2..=4 {
        let (id, _) = next.next_task();
        assert_eq!(id, want, "queued tasks keep their order");
        next.finish(id, b"ok");
    }
    let rest = results(&ix, 3);
    assert!(rest.iter().all(|(_, s, _)| *s == STATUS_RESULT));
    let c = core.counts();
    assert_eq!(
        (c.lost, c.deaths, c.requeued, c.queued, c.held),
        (1, 1, 0, 0, 0)
    );
}

#[test]
fn results_sent_just_before_death_are_forwarded_and_junk_is_ignored() {
    use std::io::Write;
    let r = rig(Duration::from_secs(30));
    let Rig {
        ix,
        mut worker,
        core,
        worker_addr,
        ..
    } = r;
    recv_kind(&ix, Kind::Register);
    // A peer that sends garbage (an absurd frame count) is cut off; the rest goes on.
    let mut junk = UnixStream::connect_addr(&worker_addr).unwrap();
    junk.write_all(&u32::MAX.to_le_bytes()).unwrap();
    send_tasks_to(&ix, &[7]);
    assert_eq!(worker.next_task().0, 7);
    worker.finish(7, b"done");
    drop(worker); // the worker exits right after sending
    died(&core);
    let got = results(&ix, 1);
    assert_eq!(got, vec![(7, STATUS_RESULT, b"done".to_vec())]);
    // The result may have left before the death was handled: wait for the death.
    let c = wait_counts(&core, "the death handled", |c| c.deaths == 1);
    assert_eq!((c.lost, c.deaths, c.results), (0, 1, 1));
    assert_eq!(core.wait_stopped(Duration::from_millis(10)), None);
}

#[test]
fn junk_is_dropped_counted_and_logged_once_per_peer() {
    let Rig {
        ix,
        mut worker,
        core,
        log,
        ..
    } = rig(Duration::from_secs(30));
    recv_kind(&ix, Kind::Register);
    for _ in 0..3 {
        ix.send_multipart([&b"pool-1"[..], b"not a header"], 0)
            .unwrap();
    }
    worker.send(&[b"junk"]);
    worker.send(&[&header(Kind::Results)[..], b"\x01"]); // a truncated meta frame
    let c = wait_counts(&core, "the junk counted", |c| c.dropped == 5);
    assert_eq!(c.dropped, 5);
    send_tasks_to(&ix, &[9]);
    assert_eq!(worker.next_task().0, 9, "the pool goes on");
    let (records, _) = log.take();
    let text: Vec<&str> = records.iter().map(|r| r.message.as_str()).collect();
    let count = |what: &str| text.iter().filter(|m| m.contains(what)).count();
    assert_eq!(
        count("dropping a message from the interchange"),
        1,
        "{text:?}"
    );
    assert_eq!(count("dropping a message from worker 0"), 1, "{text:?}");
    assert!(
        records.iter().all(|r| r.target.starts_with("htex_rs.pool")),
        "{records:?}"
    );
    core.stop();
}

#[test]
fn heartbeats_then_stops_on_shutdown_and_raises_its_signal() {
    let r = rig(Duration::from_secs(30));
    recv_kind(&r.ix, Kind::Register);
    recv_kind(&r.ix, Kind::Heartbeat);
    r.events.clear();
    let mut ep = crate::epoll::Epoll::new(1).unwrap();
    ep.add(r.events.fd(), crate::epoll::IN, 0).unwrap();
    let mut ready = Vec::new();
    ep.wait(0, &mut ready).unwrap();
    assert!(ready.is_empty(), "running and quiet: nothing to wake for");
    r.ix.send_multipart([&b"pool-1"[..], &header(Kind::Shutdown)[..]], 0)
        .unwrap();
    // The supervisor's loop: wait on the fd (no timeout of its own), lower the signal,
    // drain the log, ask for the reason. A log record wakes it too, so a few turns.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stopped = loop {
        ep.wait(5000, &mut ready).unwrap();
        assert_eq!(
            ready.len(),
            1,
            "woken only by the signal, never by a timeout"
        );
        r.events.clear();
        let _ = r.log.take();
        if let Some(s) = r.core.wait_stopped(Duration::ZERO) {
            break s;
        }
        assert!(Instant::now() < deadline);
    };
    assert_eq!(stopped, Stopped::Shutdown);
}

#[test]
fn stops_at_once_when_the_connection_breaks() {
    let r = rig(Duration::from_secs(30));
    recv_kind(&r.ix, Kind::Register);
    drop(r.ix); // the interchange side goes away: the TCP connection is reset
    assert_eq!(
        r.core.wait_stopped(Duration::from_secs(5)),
        Some(Stopped::Disconnected)
    );
}

#[test]
fn stops_when_the_interchange_is_silent_or_refuses() {
    let r = rig(Duration::from_millis(300));
    assert_eq!(
        r.core.wait_stopped(Duration::from_secs(5)),
        Some(Stopped::Silent)
    );
    let r = rig(Duration::from_secs(30));
    recv_kind(&r.ix, Kind::Register); // connected: the ROUTER can address it now
    r.ix.send_multipart(
        [&b"pool-1"[..], &header(Kind::Refused)[..], b"other version"],
        0,
    )
    .unwrap();
    assert_eq!(
        r.core.wait_stopped(Duration::from_secs(5)),
        Some(Stopped::Refused("other version".into()))
    );
}

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The task ids of a GiveBack message, and its reason.
fn given_back(f: &[Vec<u8>]) -> (String, Vec<u64>) {
    let meta = decode_meta(&f[2], f.len() - 3).unwrap();
    (
        String::from_utf8(f[1].clone()).unwrap(),
        meta.into_iter().map(|(id, _)| id).collect(),
    )
}

#[test]
fn a_block_near_its_end_hands_unstarted_tasks_back_then_leaves_with_its_reason() {
    let mut r = rig_ending(Duration::from_secs(30), Some(epoch() + 3.0));
    recv_kind(&r.ix, Kind::Register);
    send_tasks(&r, &[1, 2, 3]);
    assert_eq!(r.worker.next_task().0, 1);
    // A tenth of the 3 s left (at least 1 s) before the end: the queue goes back, the
    // running task runs on.
    let f = recv_kind(&r.ix, Kind::GiveBack);
    let (why, ids) = given_back(&f);
    assert!(why.contains("the block ends in"), "{why}");
    assert_eq!(ids, [2, 3]);
    // A task that arrives while ending goes straight back.
    send_tasks(&r, &[4]);
    let (_, ids) = given_back(&recv_kind(&r.ix, Kind::GiveBack));
    assert_eq!(ids, [4]);
    r.worker.finish(1, b"done");
    assert_eq!(results(&r.ix, 1), [(1, STATUS_RESULT, b"done".to_vec())]);
    // At the end: a (last, empty) GiveBack, then Leaving with the reason, and the core
    // stops.
    let f = recv_kind(&r.ix, Kind::Leaving);
    assert!(String::from_utf8_lossy(&f[1]).contains("reached its end"));
    match r.core.wait_stopped(Duration::from_secs(5)) {
        Some(Stopped::Ended(why)) => assert!(why.contains("reached its end"), "{why}"),
        other => panic!("{other:?}"),
    }
    let c = r.core.counts();
    assert_eq!((c.given_back, c.results), (3, 1));
}

#[test]
fn ending_now_hands_back_look_aheads_too() {
    let mut r = rig(Duration::from_secs(30));
    recv_kind(&r.ix, Kind::Register);
    // A quick first task, so the worker gets a look-ahead behind the second.
    send_tasks(&r, &[1]);
    assert_eq!(r.worker.next_task().0, 1);
    r.worker.finish(1, b"");
    results(&r.ix, 1);
    send_tasks(&r, &[2, 3, 4]);
    assert_eq!(r.worker.next_task().0, 2);
    let c = wait_counts(&r.core, "a look-ahead given", |c| c.held >= 2);
    assert!(c.held >= 2, "{c:?}");
    r.core
        .command(Command::End("SIGTERM from the batch system".into()));
    let mut back = Vec::new();
    loop {
        let f = recv_kind_any(&r.ix, &[Kind::GiveBack, Kind::Leaving]);
        if decode_header(&f[0]) == Ok(Kind::Leaving) {
            assert_eq!(f[1], b"SIGTERM from the batch system");
            break;
        }
        back.extend(given_back(&f).1);
    }
    back.sort_unstable();
    assert_eq!(back, [3, 4], "all but the running task");
    assert!(matches!(
        r.core.wait_stopped(Duration::from_secs(5)),
        Some(Stopped::Ended(_))
    ));
}
