//! Linux CPU range lists (`0-3,8-11,14`): parse with errors that name the bad part,
//! and format back in the shortest form.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuListError {
    pub input: String,
    pub reason: String,
}

impl fmt::Display for CpuListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a CPU list ({}); write ids and inclusive ranges like '0-3,8,10-11'",
            self.input, self.reason
        )
    }
}

impl std::error::Error for CpuListError {}

/// Largest CPU id accepted; guards against `0-4294967295` allocating the world.
pub const MAX_CPU: u32 = 1 << 20;

/// Parse a range list into sorted, de-duplicated CPU ids. The empty string (an empty
/// sysfs file) is the empty set; whitespace around the list (a trailing newline) is ignored.
pub fn parse(input: &str) -> Result<Vec<u32>, CpuListError> {
    let err = |reason: String| CpuListError {
        input: input.to_string(),
        reason,
    };
    let text = input.trim();
    let mut out = Vec::new();
    if text.is_empty() {
        return Ok(out);
    }
    for part in text.split(',') {
        let num = |s: &str| -> Result<u32, CpuListError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(format!("{part:?} is not a number or a range")));
            }
            let v: u32 = s.parse().map_err(|_| err(format!("{s:?} is too large")))?;
            if v > MAX_CPU {
                return Err(err(format!("CPU {v} is beyond {MAX_CPU}")));
            }
            Ok(v)
        };
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(err(format!(
                        "range {part:?} runs backwards; write {hi}-{lo}"
                    )));
                }
                out.extend(lo..=hi);
            }
            None => out.push(num(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Format sorted CPU ids as a range list (`[0,1,2,5]` -> `0-2,5`).
#[must_use]
pub fn format(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_singles_and_sysfs_whitespace() {
        assert_eq!(
            parse("0-3,8-11,14").unwrap(),
            vec![0, 1, 2, 3, 8, 9, 10, 11, 14]
        );
        assert_eq!(parse("5\n").unwrap(), vec![5]);
        assert_eq!(parse("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse("3,1,1-2").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse("100-129").unwrap().len(), 30);
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            "-2",
            "0-1-2",
            ",,",
            "1,",
            "a",
            "3-1",
            "1 2",
            "0-99999999",
            "-",
            "1--2",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse("3-1").unwrap_err().to_string().contains("backwards"));
    }

    #[test]
    fn formats_shortest_form_and_round_trips() {
        assert_eq!(format(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format(&[]), "");
        let cpus = vec![0, 2, 4, 5, 6, 64, 65, 200];
        assert_eq!(parse(&format(&cpus)).unwrap(), cpus);
    }
}
