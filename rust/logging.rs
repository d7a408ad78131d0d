//! Log records of htex_rs's threads, through the `log` crate, to where a Parsl user
//! already looks: the interchange thread into `{run_dir}/{label}/interchange.log` in
//! Parsl's line format (as Parsl's interchange process writes it); a pool into a
//! queue that its pool's Python supervisor drains into Python `logging`, so the pool's
//! `manager.log` (or the user's LogConfig) gets them without the core taking the GIL.
//! One process can run several executors (and tests run many threads), so the
//! process-wide logger routes each record to the sink of the thread that wrote it: a
//! socket thread [`attach`]es its sink first.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::Hash;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::transport::Signal;

/// A record kept for another thread to emit (see [`Sink::queue`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub level: Level,
    /// The `log` target with `.` for `::` (a Python logger name).
    pub target: String,
    pub message: String,
}

enum Out {
    File(Mutex<File>),
    /// Records, and the signal raised when one is queued (the drainer polls its fd).
    Queue(Mutex<Queue>, Option<Arc<Signal>>),
}

#[derive(Default)]
struct Queue {
    records: VecDeque<Queued>,
    /// Records dropped because nobody drained the queue in time.
    lost: u64,
}

/// Most records a queue sink holds; past it new records are counted, not kept, so a
/// supervisor that stops draining cannot make the core grow without bound.
pub const QUEUE_LIMIT: usize = 10_000;

/// Where one thread's records go, and the most verbose level taken.
pub struct Sink {
    out: Out,
    level: LevelFilter,
}

fn level_for(debug: bool) -> LevelFilter {
    if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    }
}

impl Sink {
    /// Open (append to) `path`, creating its directory; `debug` adds DEBUG records.
    pub fn open(path: &Path, debug: bool) -> std::io::Result<Arc<Sink>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Arc::new(Sink {
            out: Out::File(Mutex::new(file)),
            level: level_for(debug),
        }))
    }

    /// Keep records for [`Sink::take`] (at most [`QUEUE_LIMIT`]), raising `signal` (if
    /// any) as each is queued.
    #[must_use]
    pub fn queue(debug: bool, signal: Option<Arc<Signal>>) -> Arc<Sink> {
        Arc::new(Sink {
            out: Out::Queue(Mutex::default(), signal),
            level: level_for(debug),
        })
    }

    /// The queued records, oldest first, and how many were dropped since the last take.
    pub fn take(&self) -> (Vec<Queued>, u64) {
        match &self.out {
            Out::Queue(q, _) => {
                let mut q = q.lock().unwrap();
                let lost = std::mem::take(&mut q.lost);
                (q.records.drain(..).collect(), lost)
            }
            Out::File(_) => (Vec::new(), 0),
        }
    }

    fn write(&self, record: &Record<'_>) {
        match &self.out {
            // One write per line on an O_APPEND file, unbuffered: the log is complete if
            // the process is killed, and lines of two writers never interleave.
            Out::File(f) => {
                let _ = f.lock().unwrap().write_all(format_line(record).as_bytes());
            }
            Out::Queue(q, signal) => {
                {
                    let mut q = q.lock().unwrap();
                    if q.records.len() >= QUEUE_LIMIT {
                        q.lost += 1;
                        return;
                    }
                    q.records.push_back(Queued {
                        level: record.level(),
                        target: record.target().replace("::", "."),
                        message: record.args().to_string(),
                    });
                }
                if let Some(s) = signal {
                    s.raise();
                }
            }
        }
    }
}

/// Most peers [`FirstSeen`] remembers; past it nothing more is logged, only counted.
pub const MAX_PEERS_REMEMBERED: usize = 10_000;

/// The peers already logged about, so that a chatty or hostile peer is logged once and
/// then only counted, in bounded memory (interchange and pool alike).
pub struct FirstSeen<K> {
    seen: HashSet<K>,
}

impl<K> Default for FirstSeen<K> {
    fn default() -> Self {
        FirstSeen {
            seen: HashSet::new(),
        }
    }
}

impl<K: Eq + Hash> FirstSeen<K> {
    /// True the first time `peer` is seen, while fewer than [`MAX_PEERS_REMEMBERED`] are kept.
    pub fn first(&mut self, peer: K) -> bool {
        self.seen.len() < MAX_PEERS_REMEMBERED && self.seen.insert(peer)
    }
}

thread_local! {
    static SINK: RefCell<Option<Arc<Sink>>> = const { RefCell::new(None) };
}

struct Router;

static LOGGER: Router = Router;
static INSTALL: Once = Once::new();
/// The most verbose level any sink asked for: `log`'s global filter, so that a DEBUG
/// record costs one comparison while no sink wants DEBUG.
static MAX: Mutex<LevelFilter> = Mutex::new(LevelFilter::Off);

/// Route this thread's records to `sink` (`None`: drop them) from now on.
pub fn attach(sink: Option<Arc<Sink>>) {
    INSTALL.call_once(|| {
        // Fails only if the embedding program installed its own logger first; then
        // records go there, which is what that program asked for.
        let _ = log::set_logger(&LOGGER);
    });
    if let Some(s) = &sink {
        let mut max = MAX.lock().unwrap();
        if s.level > *max {
            *max = s.level;
            log::set_max_level(s.level);
        }
    }
    SINK.with(|cell| *cell.borrow_mut() = sink);
}

/// Parsl's level names (Python's `logging`).
fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "ERROR",
        Level::Warn => "WARNING",
        Level::Info => "INFO",
        Level::Debug | Level::Trace => "DEBUG",
    }
}

/// Local time as Python's `%(asctime)s.%(msecs)03d` with `%Y-%m-%d %H:%M:%S`.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = libc::time_t::try_from(now.as_secs()).unwrap_or(0);
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&raw const secs, &raw mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_millis()
    )
}

/// One line in Parsl's format (`parsl.log_utils` / the interchange's `set_file_logger`):
/// `%(asctime)s.%(msecs)03d %(name)s:%(lineno)d %(processName)s(%(process)d)
/// %(threadName)s %(funcName)s [%(levelname)s] %(message)s`; the module stands in for
/// the function, which Rust's records do not carry.
fn format_line(record: &Record<'_>) -> String {
    let name = record.target().replace("::", ".");
    let module = record
        .module_path()
        .and_then(|m| m.rsplit("::").next())
        .unwrap_or("");
    let thread = std::thread::current();
    format!(
        "{} {name}:{} MainProcess({}) {} {module} [{}] {}\n",
        timestamp(),
        record.line().unwrap_or(0),
        std::process::id(),
        thread.name().unwrap_or("-"),
        level_name(record.level()),
        record.args()
    )
}

impl Log for Router {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        SINK.with(|cell| {
            cell.borrow()
                .as_ref()
                .is_some_and(|s| metadata.level() <= s.level)
        })
    }

    fn log(&self, record: &Record<'_>) {
        SINK.with(|cell| {
            let sink = cell.borrow();
            let Some(s) = sink.as_ref() else { return };
            if record.level() <= s.level {
                s.write(record);
            }
        });
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_logs_into_its_own_file_at_its_own_level_in_parsls_format() {
        let dir = std::env::temp_dir().join(format!("htex-rs-log-{}", fastrand::u64(..)));
        let (a, b) = (dir.join("a/interchange.log"), dir.join("b/manager.log"));
        let (pa, pb) = (a.clone(), b.clone());
        let ta = std::thread::Builder::new()
            .name("thread-a".into())
            .spawn(move || {
                attach(Some(Sink::open(&pa, false).unwrap()));
                log::info!("hello from a");
                log::debug!("not at INFO");
            })
            .unwrap();
        let tb = std::thread::spawn(move || {
            attach(Some(Sink::open(&pb, true).unwrap()));
            log::warn!("careful");
            log::debug!("seen at DEBUG");
        });
        ta.join().unwrap();
        tb.join().unwrap();
        log::info!("a thread with no sink logs nowhere");
        let a = std::fs::read_to_string(a).unwrap();
        let b = std::fs::read_to_string(b).unwrap();
        assert_eq!(a.lines().count(), 1, "{a}");
        assert!(a.contains(" htex_rs.logging.tests:"), "{a}");
        assert!(
            a.contains(&format!(
                " MainProcess({}) thread-a tests [INFO] hello from a",
                std::process::id()
            )),
            "{a}"
        );
        let date = a.split(' ').next().unwrap();
        assert_eq!(date.len(), 10, "{a}");
        assert!(
            b.contains("[WARNING] careful") && b.contains("[DEBUG] seen at DEBUG"),
            "{b}"
        );
        assert!(!b.contains("hello"), "{b}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn first_seen_is_true_once_per_peer_and_remembers_a_bounded_number() {
        let mut f = FirstSeen::default();
        assert!(f.first(7));
        assert!(!f.first(7));
        let new = (0..MAX_PEERS_REMEMBERED + 10)
            .filter(|&p| f.first(p))
            .count();
        assert_eq!(new, MAX_PEERS_REMEMBERED - 1, "7 was already remembered");
        assert!(!f.first(usize::MAX), "full: nothing more is logged");
    }

    #[test]
    fn a_queue_sink_keeps_records_for_another_thread_up_to_its_limit() {
        let signal = Arc::new(Signal::new().unwrap());
        let sink = Sink::queue(false, Some(signal.clone()));
        let s = sink.clone();
        std::thread::spawn(move || {
            attach(Some(s));
            log::warn!("first");
            log::debug!("not at INFO");
            for i in 0..QUEUE_LIMIT + 5 {
                log::info!("record {i}");
            }
        })
        .join()
        .unwrap();
        let (records, lost) = sink.take();
        assert_eq!(records.len(), QUEUE_LIMIT);
        assert_eq!(lost, 6);
        assert_eq!(
            records[0],
            Queued {
                level: Level::Warn,
                target: "htex_rs.logging.tests".into(),
                message: "first".into()
            }
        );
        assert_eq!(sink.take(), (Vec::new(), 0), "taken once");
        assert!(
            signal.pending(),
            "queued records raise the drainer's signal"
        );
        signal.clear();
        assert!(!signal.pending());
    }
}
