//! Log records of htex_rs's threads, through the `log` crate, into the files a Parsl user
//! already reads: the interchange thread into `{run_dir}/{label}/interchange.log`, a pool
//! core into its pool's `manager.log`, in Parsl's line format. One process can run several
//! executors (and tests run many threads), so the process-wide logger routes each record
//! to the file of the thread that wrote it: a socket thread [`attach`]es its sink first.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// One log file and the most verbose level it takes.
pub struct Sink {
    file: Mutex<File>,
    level: LevelFilter,
}

impl Sink {
    /// Open (append to) `path`, creating its directory; `debug` adds DEBUG records.
    pub fn open(path: &Path, debug: bool) -> std::io::Result<Arc<Sink>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Arc::new(Sink {
            file: Mutex::new(file),
            level: if debug {
                LevelFilter::Debug
            } else {
                LevelFilter::Info
            },
        }))
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
            if record.level() > s.level {
                return;
            }
            let line = format_line(record);
            // One write per line on an O_APPEND file, unbuffered: the log is complete if
            // the process is killed, and lines of two writers never interleave.
            let _ = s.file.lock().unwrap().write_all(line.as_bytes());
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
}
