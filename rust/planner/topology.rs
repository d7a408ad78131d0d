//! Node topology without hwloc: which CPUs this process may use (sched_getaffinity,
//! so taskset, batch-system binding and cgroup cpusets are respected), and for each
//! online CPU its package, die, physical core, SMT siblings and NUMA node, read from
//! sysfs under a root directory so tests can build fake trees.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::cpulist;

/// One logical CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub id: u32,
    pub package: u32,
    pub die: u32,
    /// `core_id` is only unique within a package; `(package, die, core)` names a core.
    pub core: u32,
    pub numa: u32,
}

impl Cpu {
    #[must_use]
    pub fn core_key(&self) -> (u32, u32, u32) {
        (self.package, self.die, self.core)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Online CPUs by id.
    pub cpus: BTreeMap<u32, Cpu>,
    /// NVIDIA GPUs found in `/proc/driver/nvidia/gpus`, if that directory exists.
    pub nvidia_gpus: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError(pub String);

impl std::fmt::Display for TopologyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TopologyError {}

fn read_u32(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    // physical_package_id is -1 on some virtual machines.
    text.trim()
        .parse::<i64>()
        .ok()
        .map(|v| u32::try_from(v).unwrap_or(0))
}

impl Topology {
    /// Read the topology of the machine whose sysfs/procfs live under `root`
    /// (`/` for this machine). Missing topology files (containers, VMs) fall back to
    /// one core per CPU, package 0, NUMA node 0.
    pub fn read(root: &Path) -> Result<Topology, TopologyError> {
        let cpu_dir = root.join("sys/devices/system/cpu");
        let online_path = cpu_dir.join("online");
        let online = if let Ok(text) = fs::read_to_string(&online_path) {
            cpulist::parse(&text)
                .map_err(|e| TopologyError(format!("{}: {e}", online_path.display())))?
        } else {
            // No `online` file: take every cpuN directory.
            let mut ids: Vec<u32> = fs::read_dir(&cpu_dir)
                .map_err(|e| TopologyError(format!("cannot read {}: {e}", cpu_dir.display())))?
                .filter_map(|e| {
                    let name = e.ok()?.file_name().into_string().ok()?;
                    name.strip_prefix("cpu")?.parse().ok()
                })
                .collect();
            ids.sort_unstable();
            ids
        };
        let mut numa_of: BTreeMap<u32, u32> = BTreeMap::new();
        let node_dir = root.join("sys/devices/system/node");
        if let Ok(entries) = fs::read_dir(&node_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(node) = name
                    .strip_prefix("node")
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let path = e.path().join("cpulist");
                if let Ok(text) = fs::read_to_string(&path) {
                    let cpus = cpulist::parse(&text)
                        .map_err(|err| TopologyError(format!("{}: {err}", path.display())))?;
                    for c in cpus {
                        numa_of.insert(c, node);
                    }
                }
            }
        }
        let mut cpus = BTreeMap::new();
        for id in online {
            let t: PathBuf = cpu_dir.join(format!("cpu{id}/topology"));
            let cpu = Cpu {
                id,
                package: read_u32(&t.join("physical_package_id")).unwrap_or(0),
                die: read_u32(&t.join("die_id")).unwrap_or(0),
                core: read_u32(&t.join("core_id")).unwrap_or(id),
                numa: numa_of.get(&id).copied().unwrap_or(0),
            };
            cpus.insert(id, cpu);
        }
        let nvidia_gpus = fs::read_dir(root.join("proc/driver/nvidia/gpus"))
            .ok()
            .map(|d| d.flatten().count());
        Ok(Topology { cpus, nvidia_gpus })
    }

    /// A synthetic topology: `packages` x `cores_per_package` x `threads` CPUs, numbered
    /// Linux-style (first thread of every core, then the second threads), with the cores
    /// of each package split evenly over `numa_per_package` NUMA nodes.
    #[must_use]
    pub fn synthetic(
        packages: u32,
        cores_per_package: u32,
        threads: u32,
        numa_per_package: u32,
    ) -> Topology {
        let mut cpus = BTreeMap::new();
        let total_cores = packages * cores_per_package;
        let per_numa = cores_per_package / numa_per_package.max(1);
        for t in 0..threads {
            for p in 0..packages {
                for c in 0..cores_per_package {
                    let id = t * total_cores + p * cores_per_package + c;
                    let numa =
                        p * numa_per_package + (c / per_numa.max(1)).min(numa_per_package - 1);
                    cpus.insert(
                        id,
                        Cpu {
                            id,
                            package: p,
                            die: 0,
                            core: c,
                            numa,
                        },
                    );
                }
            }
        }
        Topology {
            cpus,
            nvidia_gpus: None,
        }
    }

    #[must_use]
    pub fn get(&self, id: u32) -> Option<&Cpu> {
        self.cpus.get(&id)
    }
}

/// The CPUs this process may run on (its affinity mask), sorted. The mask may be
/// larger than glibc's fixed 1024-CPU `cpu_set_t` (the kernel's `nr_cpu_ids`).
pub fn allowed_cpus() -> Result<Vec<u32>, TopologyError> {
    allowed_cpus_from(128)
}

/// [`allowed_cpus`] starting with a mask of `bytes`, doubled while the kernel's is larger.
fn allowed_cpus_from(mut bytes: usize) -> Result<Vec<u32>, TopologyError> {
    loop {
        let mut mask = vec![0u64; bytes.div_ceil(8)];
        let size = mask.len() * 8;
        // SAFETY: the kernel writes at most `size` bytes into `mask`, which has them.
        let rc = unsafe { libc::sched_getaffinity(0, size, mask.as_mut_ptr().cast()) };
        if rc == 0 {
            return Ok(mask_cpus(&mask));
        }
        let err = std::io::Error::last_os_error();
        // EINVAL: the kernel's mask is larger than ours.
        if err.raw_os_error() == Some(libc::EINVAL) && size < (1 << 20) {
            bytes = size * 2;
            continue;
        }
        return Err(TopologyError(format!("sched_getaffinity failed: {err}")));
    }
}

/// The CPU numbers set in a kernel CPU mask (64-bit words, CPU 0 the lowest bit).
fn mask_cpus(mask: &[u64]) -> Vec<u32> {
    let mut out = Vec::new();
    for (w, word) in mask.iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push((w * 64 + b) as u32);
            }
        }
    }
    out
}

#[cfg(test)]
pub mod fake {
    //! Fake sysfs trees for tests.
    use std::fs;
    use std::path::{Path, PathBuf};

    pub struct FakeCpu {
        pub id: u32,
        pub package: u32,
        pub core: u32,
    }

    pub struct Tree {
        pub root: PathBuf,
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Build a tree: `online` list text, CPUs with topology files, NUMA node cpulists.
    #[must_use]
    pub fn tree(online: &str, cpus: &[FakeCpu], numa: &[&str], gpus: Option<usize>) -> Tree {
        let root = std::env::temp_dir().join(format!(
            "htex-rs-sysfs-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let cpu_dir = root.join("sys/devices/system/cpu");
        write(&cpu_dir.join("online"), &format!("{online}\n"));
        for c in cpus {
            let t = cpu_dir.join(format!("cpu{}/topology", c.id));
            write(&t.join("physical_package_id"), &format!("{}\n", c.package));
            write(&t.join("core_id"), &format!("{}\n", c.core));
            write(&t.join("die_id"), "0\n");
        }
        for (n, list) in numa.iter().enumerate() {
            write(
                &root.join(format!("sys/devices/system/node/node{n}/cpulist")),
                &format!("{list}\n"),
            );
        }
        if let Some(g) = gpus {
            for i in 0..g {
                write(
                    &root.join(format!(
                        "proc/driver/nvidia/gpus/0000:0{i}:00.0/information"
                    )),
                    "x",
                );
            }
        }
        Tree { root }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{tree, FakeCpu};
    use super::*;

    #[test]
    fn a_mask_of_any_size_is_read_and_decoded() {
        // Starting with one byte forces the EINVAL-and-grow path wherever the kernel's
        // mask is wider than 8 CPUs; the answer must not depend on the starting size.
        assert_eq!(allowed_cpus_from(1).unwrap(), allowed_cpus().unwrap());
        assert!(!allowed_cpus().unwrap().is_empty());
        // CPUs past glibc's 1024-CPU cpu_set_t decode too.
        let mut mask = vec![0u64; 40];
        mask[0] = 0b101;
        mask[16] = 1 << 3; // CPU 1027
        mask[39] = 1 << 63; // CPU 2559
        assert_eq!(mask_cpus(&mask), vec![0, 2, 1027, 2559]);
    }

    #[test]
    fn reads_smt_siblings_two_packages_and_numa_nodes() {
        // 2 packages x 2 cores x 2 threads; CPU n and n+4 are siblings.
        let cpus: Vec<FakeCpu> = (0..8)
            .map(|id| FakeCpu {
                id,
                package: (id % 4) / 2,
                core: id % 2,
            })
            .collect();
        let t = tree("0-7", &cpus, &["0-1,4-5", "2-3,6-7"], Some(2));
        let topo = Topology::read(&t.root).unwrap();
        assert_eq!(topo.cpus.len(), 8);
        assert_eq!(
            topo.get(5).unwrap().core_key(),
            topo.get(1).unwrap().core_key()
        );
        assert_ne!(
            topo.get(0).unwrap().core_key(),
            topo.get(2).unwrap().core_key()
        );
        assert_eq!(topo.get(2).unwrap().core, topo.get(0).unwrap().core); // core_id repeats per package
        assert_eq!(topo.get(6).unwrap().numa, 1);
        assert_eq!(topo.nvidia_gpus, Some(2));
    }

    #[test]
    fn offline_cpus_are_skipped_and_missing_files_fall_back() {
        let cpus: Vec<FakeCpu> = [0u32, 1, 3]
            .iter()
            .map(|&id| FakeCpu {
                id,
                package: 0,
                core: id,
            })
            .collect();
        let t = tree("0-1,3", &cpus, &[], None);
        let topo = Topology::read(&t.root).unwrap();
        assert_eq!(topo.cpus.keys().copied().collect::<Vec<_>>(), vec![0, 1, 3]);
        assert!(topo.cpus.values().all(|c| c.numa == 0));
        assert_eq!(topo.nvidia_gpus, None);
    }

    #[test]
    fn more_than_64_cpus() {
        let cpus: Vec<FakeCpu> = (0..160)
            .map(|id| FakeCpu {
                id,
                package: id / 80,
                core: id % 80,
            })
            .collect();
        let t = tree("0-159", &cpus, &["0-79", "80-159"], None);
        let topo = Topology::read(&t.root).unwrap();
        assert_eq!(topo.cpus.len(), 160);
        assert_eq!(topo.get(150).unwrap().numa, 1);
    }

    #[test]
    fn malformed_online_list_is_an_error() {
        let t = tree("0-3-", &[], &[], None);
        assert!(Topology::read(&t.root).unwrap_err().0.contains("online"));
    }

    #[test]
    fn synthetic_topology_numbers_siblings_like_linux() {
        let topo = Topology::synthetic(2, 4, 2, 2);
        assert_eq!(topo.cpus.len(), 16);
        assert_eq!(
            topo.get(0).unwrap().core_key(),
            topo.get(8).unwrap().core_key()
        );
        assert_eq!(topo.get(3).unwrap().numa, 1);
        assert_eq!(topo.get(4).unwrap().numa, 2);
    }

    #[test]
    fn this_process_has_allowed_cpus() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(Topology::read(Path::new("/")).unwrap().cpus.len() >= cpus.len());
    }
}
