//! A per-interchange log file (`{run_dir}/{label}/interchange.log`). Each executor has
//! its own file, so this is not a process-global `log` backend.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::managers::epoch_now;

pub struct LogFile {
    out: Option<File>,
    pub debug: bool,
}

impl LogFile {
    pub fn open(path: Option<&Path>, debug: bool) -> std::io::Result<LogFile> {
        let out = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(OpenOptions::new().create(true).append(true).open(p)?)
            }
            None => None,
        };
        Ok(LogFile { out, debug })
    }

    pub fn write(&mut self, level: &str, msg: &str) {
        if let Some(f) = self.out.as_mut() {
            // Unbuffered on purpose: the log must be complete if the process is killed.
            let _ = writeln!(f, "{:.3} interchange {level}: {msg}", epoch_now());
        }
    }

    pub fn info(&mut self, msg: &str) {
        self.write("INFO", msg);
    }

    pub fn warn(&mut self, msg: &str) {
        self.write("WARNING", msg);
    }
}
