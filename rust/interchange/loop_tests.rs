//! The interchange's loop end to end: a real `Handle`, a real worker port, libzmq
//! DEALERs as pools. The dispatch rules themselves are tested in `dispatch.rs`.

use super::*;
use crate::protocol::{STATUS_RESULT, STATUS_UNPLACEABLE};
use crate::resources;
use crate::zmtp::curve;

#[test]
fn python_versions_compare_by_major_minor() {
    assert!(same_minor("3.11.7", "3.11"));
    assert!(same_minor("3.11.2", "3.11.9"));
    assert!(!same_minor("3.12.0", "3.11.7"));
}

fn start(threshold: Duration, curve: Option<curve::Server>) -> Handle {
    Handle::start(Config {
        heartbeat_threshold: threshold,
        curve,
        ..Config::default()
    })
    .unwrap()
}

/// A fake pool: a DEALER that registers with the given capacity and drain time.
fn pool(ctx: &zmq::Context, port: u16, uid: &str, cap: u32, drain: Option<f64>) -> zmq::Socket {
    let reg = Registration {
        protocol_version: PROTOCOL_VERSION,
        uid: uid.into(),
        block_id: Some("0".into()),
        hostname: "testhost".into(),
        worker_count: cap,
        max_capacity: cap,
        drain_time: drain,
        ..Registration::default()
    };
    pool_with(ctx, port, &reg)
}

/// A fake pool that registers with `reg`.
fn pool_with(ctx: &zmq::Context, port: u16, reg: &Registration) -> zmq::Socket {
    let s = ctx.socket(zmq::DEALER).unwrap();
    s.set_linger(0).unwrap();
    s.set_identity(reg.uid.as_bytes()).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    s.send_multipart(
        [
            &header(Kind::Register)[..],
            &serde_json::to_vec(reg).unwrap(),
        ],
        0,
    )
    .unwrap();
    assert_eq!(recv(&s)[0], header(Kind::Registered));
    s
}

fn recv(s: &zmq::Socket) -> Vec<Vec<u8>> {
    assert!(s.poll(zmq::POLLIN, 5000).unwrap() > 0, "nothing received");
    s.recv_multipart(0).unwrap()
}

fn task(id: u64, priority: f64) -> NewTask {
    NewTask::plain(id, priority, 0, id.to_le_bytes().to_vec().into())
}

fn wait_for<T>(h: &Handle, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for e in h.wait_events(Duration::from_millis(100), usize::MAX) {
            if let Some(t) = pick(e) {
                return t;
            }
        }
    }
    panic!("event not seen");
}

#[test]
fn tasks_go_out_in_priority_order_in_batches_and_results_come_back() {
    let h = start(Duration::from_secs(60), None);
    h.submit([
        task(1, f64::INFINITY),
        task(2, 5.0),
        task(3, 1.0),
        task(4, 5.0),
    ]);
    let ctx = zmq::Context::new();
    let p = pool(&ctx, h.port, "p1", 4, None);
    let frames = recv(&p);
    assert_eq!(frames[0], header(Kind::Tasks));
    let meta = decode_meta(&frames[1], frames.len() - 2).unwrap();
    assert_eq!(
        meta.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![3, 2, 4, 1]
    );
    assert_eq!(frames[2], 3u64.to_le_bytes());
    p.send_multipart(
        [
            &header(Kind::Results)[..],
            &encode_meta(&[(3, STATUS_RESULT)]),
            b"ok",
        ],
        0,
    )
    .unwrap();
    let (id, payload) = wait_for(&h, |e| match e {
        Event::Result {
            task_id, payload, ..
        } => Some((task_id, payload.to_vec())),
        _ => None,
    });
    assert_eq!((id, payload), (3, b"ok".to_vec()));
    let infos = {
        let (tx, rx) = std::sync::mpsc::channel();
        h.command(Command::Managers(tx));
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    };
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].tasks, 3);
}

/// A pool found and sent to by its connection: when it reconnects under the same
/// identity (a DEALER after a network blip), its results on the new connection are
/// still its own and its next tasks go to the new connection.
#[test]
fn a_pool_that_reconnects_under_its_identity_keeps_its_tasks_and_gets_new_ones() {
    let h = start(Duration::from_secs(60), None);
    let ctx = zmq::Context::new();
    let first = pool(&ctx, h.port, "p1", 2, None);
    h.submit([task(1, 0.0), task(2, 0.0)]);
    let mut sent = sent_ids(&first);
    if sent.len() < 2 {
        sent.extend(sent_ids(&first));
    }
    sent.sort_unstable();
    assert_eq!(sent, [1, 2]);
    drop(first);
    // The same identity on a new connection, without registering again.
    let second = ctx.socket(zmq::DEALER).unwrap();
    second.set_linger(0).unwrap();
    second.set_identity(b"p1").unwrap();
    second
        .connect(&format!("tcp://127.0.0.1:{}", h.port))
        .unwrap();
    let done = |id: u64| {
        [
            header(Kind::Results).to_vec(),
            encode_meta(&[(id, STATUS_RESULT)]),
            b"ok".to_vec(),
        ]
    };
    // Until the old connection is gone the new one is refused (libzmq's rule): retry.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        second.send_multipart(done(1), 0).unwrap();
        got = h
            .wait_events(Duration::from_millis(100), usize::MAX)
            .into_iter()
            .find_map(|e| match e {
                Event::Result { task_id, .. } => Some(task_id),
                _ => None,
            });
    }
    assert_eq!(
        got,
        Some(1),
        "the result on the new connection is the pool's"
    );
    // Its freed slot takes the next task, on the new connection.
    h.submit([task(3, 0.0)]);
    assert_eq!(sent_ids(&second), [3]);
    let infos = h.ask(Command::Managers).unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].tasks, 2, "task 2 is still held, task 3 added");
}

fn typed(id: u64, cores: u32) -> NewTask {
    let request = resources::Resources {
        cores,
        ..resources::Resources::default()
    };
    NewTask::with_head(id, f64::INFINITY, 0, &id.to_le_bytes(), Some(request), None)
}

fn sent_ids(p: &zmq::Socket) -> Vec<u64> {
    let frames = recv(p);
    assert_eq!(frames[0], header(Kind::Tasks));
    decode_meta(&frames[1], frames.len() - 2)
        .unwrap()
        .iter()
        .map(|m| m.0)
        .collect()
}

#[test]
fn resource_tasks_wait_for_room_and_one_too_big_for_every_pool_fails_at_once() {
    let h = start(Duration::from_secs(60), None);
    let ctx = zmq::Context::new();
    let p = pool_with(
        &ctx,
        h.port,
        &Registration {
            protocol_version: PROTOCOL_VERSION,
            uid: "p4".into(),
            block_id: Some("0".into()),
            worker_count: 4,
            max_capacity: 8,
            resources: Some(resources::Resources {
                cores: 4,
                memory: 1000,
                gpus: 0,
            }),
            ..Registration::default()
        },
    );
    h.submit([typed(1, 4), typed(2, 2), typed(3, 8)]);
    let (id, message) = wait_for(&h, |e| match e {
        Event::Result {
            task_id,
            status: STATUS_UNPLACEABLE,
            payload,
        } => Some((task_id, String::from_utf8_lossy(&payload).into_owned())),
        _ => None,
    });
    assert_eq!(id, 3);
    assert!(
        message.contains("8 cores") && message.contains("the largest: 4 cores"),
        "{message}"
    );
    assert_eq!(sent_ids(&p), [1], "task 2 waits: task 1 holds all 4 cores");
    h.submit([task(9, 0.0)]);
    assert_eq!(
        sent_ids(&p),
        [9],
        "plain tasks are not held back by resources"
    );
    assert_eq!(
        p.poll(zmq::POLLIN, 300).unwrap(),
        0,
        "still no room for task 2"
    );
    p.send_multipart(
        [
            &header(Kind::Results)[..],
            &encode_meta(&[(1, STATUS_RESULT)]),
            b"ok",
        ],
        0,
    )
    .unwrap();
    assert_eq!(sent_ids(&p), [2], "task 1's cores came back");
}

#[test]
fn a_silent_manager_is_lost_with_its_tasks() {
    let h = start(Duration::from_millis(300), None);
    let ctx = zmq::Context::new();
    let p = pool(&ctx, h.port, "quiet", 2, None);
    h.submit([task(7, 0.0), task(8, 0.0)]);
    recv(&p);
    let lost = wait_for(&h, |e| match e {
        Event::ManagerLost {
            uid,
            hostname,
            tasks,
            ..
        } => Some((uid, hostname, tasks)),
        _ => None,
    });
    assert_eq!(
        lost,
        ("quiet".to_string(), "testhost".to_string(), vec![7, 8])
    );
}

#[test]
fn a_drained_idle_manager_is_told_to_exit_and_a_held_one_gets_nothing() {
    let h = start(Duration::from_secs(60), None);
    let ctx = zmq::Context::new();
    let drained = pool(&ctx, h.port, "drained", 1, Some(0.0));
    assert_eq!(recv(&drained)[0], header(Kind::Shutdown));
    let held = pool(&ctx, h.port, "held", 1, None);
    let (tx, rx) = std::sync::mpsc::channel();
    h.command(Command::Hold("held".into(), tx));
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    h.submit([task(1, 0.0)]);
    assert_eq!(held.poll(zmq::POLLIN, 300).unwrap(), 0);
}

#[test]
fn another_protocol_version_is_refused_and_reported() {
    let h = start(Duration::from_secs(60), None);
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::DEALER).unwrap();
    s.set_linger(0).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{}", h.port)).unwrap();
    s.send(
        &[b'H', b'X', PROTOCOL_VERSION + 1, Kind::Probe as u8][..],
        0,
    )
    .unwrap();
    let frames = recv(&s);
    assert_eq!(frames[0], header(Kind::Refused));
    let msg = wait_for(&h, |e| match e {
        Event::Fatal(m) => Some(m),
        _ => None,
    });
    assert!(msg.contains(&format!("v{}", PROTOCOL_VERSION + 1)));
    assert!(msg.contains(&format!("v{PROTOCOL_VERSION}")));
    assert_eq!(String::from_utf8_lossy(&frames[1]), msg);
}

#[test]
fn curve_serves_listed_clients_only() {
    let server = zmq::CurveKeyPair::new().unwrap();
    let client = zmq::CurveKeyPair::new().unwrap();
    let rogue = zmq::CurveKeyPair::new().unwrap();
    let h = start(
        Duration::from_secs(60),
        Some(curve::Server::new(
            zeroize::Zeroizing::new(server.secret_key),
            [client.public_key],
        )),
    );
    let ctx = zmq::Context::new();
    let probe = |keys: &zmq::CurveKeyPair| {
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_curve_serverkey(&server.public_key).unwrap();
        s.set_curve_publickey(&keys.public_key).unwrap();
        s.set_curve_secretkey(&keys.secret_key).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{}", h.port)).unwrap();
        s.send(&header(Kind::Probe)[..], 0).unwrap();
        s.poll(zmq::POLLIN, 1000).unwrap() > 0
    };
    assert!(!probe(&rogue));
    assert!(probe(&client));
    assert!(h.stats().dropped.load(Ordering::Relaxed) >= 1);
}

#[test]
fn a_pool_that_ends_gives_its_unstarted_tasks_back_and_fails_the_rest_with_its_reason() {
    let h = start(Duration::from_secs(60), None);
    let ctx = zmq::Context::new();
    let a = pool(&ctx, h.port, "a", 4, None);
    h.submit([task(1, 0.0), task(2, 0.0), task(3, 0.0)]);
    assert_eq!(sent_ids(&a), [1, 2, 3]);
    // `a` hands back 2 and 3, and 99, which it never held (dropped, not run).
    let meta = encode_meta(&[(2, 0), (3, 0), (99, 0)]);
    a.send_multipart(
        [
            &header(Kind::GiveBack)[..],
            b"the block ends in 30 s",
            &meta,
            &2u64.to_le_bytes(),
            &3u64.to_le_bytes(),
            &99u64.to_le_bytes(),
        ],
        0,
    )
    .unwrap();
    // They run elsewhere; `a` is sent nothing more.
    let b = pool(&ctx, h.port, "b", 4, None);
    assert_eq!(sent_ids(&b), [2, 3]);
    h.submit([task(4, 0.0)]);
    assert_eq!(sent_ids(&b), [4]);
    // `a` leaves: the task it still ran fails at once, with its reason.
    a.send_multipart(
        [&header(Kind::Leaving)[..], b"the block reached its end"],
        0,
    )
    .unwrap();
    let lost = wait_for(&h, |e| match e {
        Event::ManagerLost {
            uid, tasks, reason, ..
        } => Some((uid, tasks, reason)),
        _ => None,
    });
    assert_eq!(
        lost,
        (
            "a".to_string(),
            vec![1],
            Some("the block reached its end".to_string())
        )
    );
    assert!(a.poll(zmq::POLLIN, 200).unwrap() == 0 || recv(&a)[0] != header(Kind::Tasks));
}
