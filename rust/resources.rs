//! Per-task resources: what a task asks for (Parsl's WorkQueue/TaskVine names and units:
//! `cores` and `gpus` are counts, `memory` is MB), what a pool has, and what a pool grants
//! a task (which CPUs, which accelerators).
//!
//! A task with a request carries [`FLAG_RESOURCES`] in its meta entry, and its payload
//! starts with the request as JSON behind a u32 LE length; the interchange reads it to
//! match the task to a pool with room, the pool to grant it CPUs and accelerators,
//! and replaces it with the [`Grant`] (same layout) for the worker. Tasks without the flag
//! are untouched: their payloads stay opaque and nothing here runs for them.

use serde::{Deserialize, Serialize};

/// Meta flag: the payload starts with a length-prefixed JSON request (or grant).
pub const FLAG_RESOURCES: u8 = 2;
/// Meta flag: the task has a time limit, `walltime` (seconds) in the same JSON head. The
/// pool ends the task past it, and takes the head off (or puts its grant there) before
/// the task goes to a worker, which never sees this flag.
pub const FLAG_WALLTIME: u8 = 4;

/// A task's head as the interchange writes it: what it asks for, and its time limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Head {
    #[serde(flatten)]
    pub request: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walltime: Option<f64>,
}

impl Head {
    /// The head's JSON (`walltime` only when set).
    #[must_use]
    pub fn to_json(self) -> Vec<u8> {
        serde_json::to_vec(&self).expect("numbers serialize")
    }
}

/// What a task's head says, by its meta flags: its request (`FLAG_RESOURCES`) and its
/// time limit (`FLAG_WALLTIME`); `None` for what is not flagged, or malformed.
#[must_use]
pub fn head_of(flags: u8, payload: &[u8]) -> (Option<Resources>, Option<std::time::Duration>) {
    let request = (flags & FLAG_RESOURCES != 0)
        .then(|| request_of(payload))
        .flatten();
    let walltime = (flags & FLAG_WALLTIME != 0)
        .then(|| walltime_of(payload))
        .flatten();
    (request, walltime)
}

/// The time limit in a flagged payload's head (`None`: none, or malformed).
#[must_use]
pub fn walltime_of(payload: &[u8]) -> Option<std::time::Duration> {
    let head: Head = serde_json::from_slice(split(payload)?.0).ok()?;
    head.walltime
        .filter(|w| w.is_finite() && *w > 0.0)
        .map(|w| std::time::Duration::from_secs_f64(w.min(1e9)))
}

/// Cores, memory (MB) and GPUs: a task's request, or a pool's totals or free share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub cores: u32,
    pub memory: u64,
    pub gpus: u32,
}

impl Resources {
    /// `self` fits in `room`.
    #[must_use]
    pub fn fits(&self, room: &Resources) -> bool {
        self.cores <= room.cores && self.memory <= room.memory && self.gpus <= room.gpus
    }

    #[must_use]
    pub fn plus(&self, o: &Resources) -> Resources {
        Resources {
            cores: self.cores.saturating_add(o.cores),
            memory: self.memory.saturating_add(o.memory),
            gpus: self.gpus.saturating_add(o.gpus),
        }
    }

    #[must_use]
    pub fn minus(&self, o: &Resources) -> Resources {
        Resources {
            cores: self.cores.saturating_sub(o.cores),
            memory: self.memory.saturating_sub(o.memory),
            gpus: self.gpus.saturating_sub(o.gpus),
        }
    }
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cores, {} MB memory, {} GPUs",
            self.cores, self.memory, self.gpus
        )
    }
}

/// What a pool gives one task: the request, and the CPUs and accelerators granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(flatten)]
    pub request: Resources,
    pub cpus: Vec<u32>,
    pub accelerators: Vec<String>,
    /// The allocator's slot indices (declared slots beyond the real CPUs share ids).
    #[serde(skip)]
    slots: Vec<usize>,
    /// The allocator's accelerator indices (an oversubscribed GPU is listed twice).
    #[serde(skip)]
    accel: Vec<usize>,
}

impl Grant {
    /// The head the worker reads (see `htex_rs.worker`): the grant, and the environment
    /// the task runs with: the OpenMP affinity variables for its CPUs, its accelerators
    /// in the CUDA/ROCm/oneAPI variables (none visible when it asked for none), and
    /// `PARSL_CORES`, `PARSL_MEMORY`, `PARSL_GPUS`.
    #[must_use]
    pub fn head(&self) -> Vec<u8> {
        let mut env: serde_json::Map<String, serde_json::Value> =
            crate::planner::affinity_env(&self.cpus)
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .collect();
        let devices = self.accelerators.join(",");
        for var in [
            "CUDA_VISIBLE_DEVICES",
            "ROCR_VISIBLE_DEVICES",
            "ZE_AFFINITY_MASK",
        ] {
            env.insert(var.into(), devices.clone().into());
        }
        env.insert("PARSL_CORES".into(), self.request.cores.to_string().into());
        env.insert(
            "PARSL_MEMORY".into(),
            self.request.memory.to_string().into(),
        );
        env.insert("PARSL_GPUS".into(), self.request.gpus.to_string().into());
        let mut doc = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = doc.as_object_mut() {
            o.insert("env".into(), env.into());
        }
        doc.to_string().into_bytes()
    }
}

/// A pool's CPU slots: the `allowed` CPUs in the order grants take them (NUMA node by
/// node, a core's hyperthreads side by side, so a grant of adjacent free slots is whole
/// cores on one node). `declared` slots instead of one per CPU (a pool that
/// oversubscribes on purpose, or keeps CPUs back) repeat or cut that order.
#[must_use]
pub fn cpu_slots(
    topo: &crate::planner::Topology,
    allowed: &[u32],
    declared: Option<usize>,
) -> Vec<Slot> {
    let mut cpus: Vec<(u32, (u32, u32, u32), u32)> = allowed
        .iter()
        .map(|id| match topo.get(*id) {
            Some(c) => (c.numa, c.core_key(), c.id),
            None => (0, (0, 0, *id), *id),
        })
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Vec::new();
    }
    let n = declared.unwrap_or(cpus.len());
    (0..n)
        .map(|i| {
            let (numa, _, cpu) = cpus[i % cpus.len()];
            Slot { cpu, numa }
        })
        .collect()
}

/// Split a payload flagged [`FLAG_RESOURCES`] into its JSON head and the rest.
#[must_use]
pub fn split(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    Some((payload.get(4..end)?, payload.get(end..)?))
}

/// The request at the head of a flagged payload (`None`: malformed).
#[must_use]
pub fn request_of(payload: &[u8]) -> Option<Resources> {
    serde_json::from_slice(split(payload)?.0).ok()
}

/// `head` (JSON) behind its length, then `rest`: the layout [`split`] reads.
#[must_use]
pub fn join(head: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + head.len() + rest.len());
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(rest);
    out
}

/// One CPU slot of a pool: the CPU id to pin to and its NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub cpu: u32,
    pub numa: u32,
}

/// A pool's CPUs, memory and accelerators, and which are granted. CPU slots are listed
/// in the planner's order (cores' hyperthreads next to each other, NUMA node by node),
/// so a grant of adjacent free slots is whole cores on one node when it can be.
pub struct Allocator {
    slots: Vec<Slot>,
    free_slot: Vec<bool>,
    accelerators: Vec<String>,
    free_accel: Vec<bool>,
    memory: u64,
    memory_free: u64,
}

impl Allocator {
    #[must_use]
    pub fn new(slots: Vec<Slot>, memory: u64, accelerators: Vec<String>) -> Allocator {
        Allocator {
            free_slot: vec![true; slots.len()],
            free_accel: vec![true; accelerators.len()],
            slots,
            accelerators,
            memory,
            memory_free: memory,
        }
    }

    #[cfg(test)]
    /// The pool's totals, as it advertises them.
    #[must_use]
    pub fn totals(&self) -> Resources {
        Resources {
            cores: u32::try_from(self.slots.len()).unwrap_or(u32::MAX),
            memory: self.memory,
            gpus: u32::try_from(self.accelerators.len()).unwrap_or(u32::MAX),
        }
    }

    /// What is not granted now.
    #[must_use]
    pub fn free(&self) -> Resources {
        let count = |v: &[bool]| u32::try_from(v.iter().filter(|f| **f).count()).unwrap_or(0);
        Resources {
            cores: count(&self.free_slot),
            memory: self.memory_free,
            gpus: count(&self.free_accel),
        }
    }

    /// Grant `req` if it fits now: CPU slots from one NUMA node when one has enough free,
    /// the first free run of them in the planner's order; the first free accelerators.
    pub fn grant(&mut self, req: &Resources) -> Option<Grant> {
        if !req.fits(&self.free()) {
            return None;
        }
        let want = req.cores as usize;
        let free_on = |numa: Option<u32>| {
            self.slots
                .iter()
                .enumerate()
                .filter(|(i, s)| self.free_slot[*i] && numa.is_none_or(|n| s.numa == n))
                .map(|(i, _)| i)
                .collect::<Vec<usize>>()
        };
        let mut nodes: Vec<u32> = self.slots.iter().map(|s| s.numa).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let picked: Vec<usize> = nodes
            .into_iter()
            .map(|n| free_on(Some(n)))
            .find(|f| f.len() >= want)
            .unwrap_or_else(|| free_on(None))
            .into_iter()
            .take(want)
            .collect();
        let accel: Vec<usize> = (0..self.accelerators.len())
            .filter(|i| self.free_accel[*i])
            .take(req.gpus as usize)
            .collect();
        for i in &picked {
            self.free_slot[*i] = false;
        }
        for i in &accel {
            self.free_accel[*i] = false;
        }
        self.memory_free -= req.memory;
        let mut cpus: Vec<u32> = picked.iter().map(|i| self.slots[*i].cpu).collect();
        cpus.sort_unstable();
        cpus.dedup(); // declared slots beyond the real CPUs map onto the same ids
        Some(Grant {
            request: *req,
            cpus,
            accelerators: accel
                .iter()
                .map(|i| self.accelerators[*i].clone())
                .collect(),
            slots: picked,
            accel,
        })
    }

    /// Give a grant's resources back.
    pub fn release(&mut self, g: &Grant) {
        for i in &g.slots {
            self.free_slot[*i] = true;
        }
        for i in &g.accel {
            self.free_accel[*i] = true;
        }
        self.memory_free = (self.memory_free + g.request.memory).min(self.memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slots(numa_sizes: &[u32]) -> Vec<Slot> {
        let mut out = Vec::new();
        let mut cpu = 0;
        for (n, size) in numa_sizes.iter().enumerate() {
            for _ in 0..*size {
                out.push(Slot {
                    cpu,
                    numa: n as u32,
                });
                cpu += 1;
            }
        }
        out
    }

    fn req(cores: u32, memory: u64, gpus: u32) -> Resources {
        Resources {
            cores,
            memory,
            gpus,
        }
    }

    #[test]
    fn payload_head_round_trips_and_junk_is_none() {
        let p = join(br#"{"cores":4,"memory":8000}"#, b"rest");
        assert_eq!(request_of(&p), Some(req(4, 8000, 0)));
        assert_eq!(split(&p).unwrap().1, b"rest");
        assert_eq!(request_of(b"\x09\0\0\0{}"), None, "length past the end");
        assert_eq!(request_of(b"\x02"), None);
        assert_eq!(request_of(&join(b"not json", b"")), None);
    }

    #[test]
    fn grants_prefer_one_numa_node_and_come_back() {
        let mut a = Allocator::new(slots(&[4, 4]), 1000, vec!["0".into(), "1".into()]);
        let g1 = a.grant(&req(2, 100, 1)).unwrap();
        assert_eq!(g1.cpus, [0, 1]);
        assert_eq!(g1.accelerators, ["0"]);
        let g2 = a.grant(&req(3, 100, 0)).unwrap();
        assert_eq!(g2.cpus, [4, 5, 6], "node 0 has only 2 free: node 1");
        let g3 = a.grant(&req(2, 100, 1)).unwrap();
        assert_eq!(g3.cpus, [2, 3]);
        assert!(a.grant(&req(2, 0, 0)).is_none(), "1 free core left");
        assert!(a.grant(&req(0, 0, 1)).is_none(), "no free GPU");
        assert!(a.grant(&req(1, 701, 0)).is_none(), "700 MB free");
        a.release(&g2);
        a.release(&g1);
        assert_eq!(a.free(), req(6, 900, 1));
        a.release(&g3);
        assert_eq!(a.free(), a.totals());
    }

    #[test]
    fn declared_slots_beyond_the_real_cpus_share_ids() {
        let s: Vec<Slot> = (0..8)
            .map(|i| Slot {
                cpu: i % 2,
                numa: 0,
            })
            .collect();
        let mut a = Allocator::new(s, 0, vec![]);
        let g = a.grant(&req(4, 0, 0)).unwrap();
        assert_eq!(g.cpus, [0, 1]);
        assert_eq!(a.free().cores, 4);
        a.release(&g);
        assert_eq!(a.free().cores, 8);
    }

    #[test]
    fn slots_go_numa_node_by_node_with_hyperthreads_side_by_side() {
        // 1 package, 4 cores x 2 threads, 2 NUMA nodes; ids 0-3 are the cores' first
        // threads, 4-7 their second (Linux's usual numbering).
        let topo = crate::planner::Topology::synthetic(1, 4, 2, 2);
        let all: Vec<u32> = topo.cpus.keys().copied().collect();
        let s = cpu_slots(&topo, &all, None);
        assert_eq!(s.len(), 8);
        for pair in s.chunks(2) {
            let (a, b) = (
                topo.get(pair[0].cpu).unwrap(),
                topo.get(pair[1].cpu).unwrap(),
            );
            assert_eq!(
                a.core_key(),
                b.core_key(),
                "a core's threads side by side: {s:?}"
            );
        }
        assert!(s.windows(2).all(|w| w[0].numa <= w[1].numa));
        let declared = cpu_slots(&topo, &[3, 1], Some(5));
        assert_eq!(declared.len(), 5);
        assert_eq!(
            declared[0].cpu, declared[2].cpu,
            "declared slots repeat the CPUs"
        );
        assert!(cpu_slots(&topo, &[], Some(4)).is_empty());
    }

    #[test]
    fn an_oversubscribed_gpu_is_two_accelerators_and_the_head_names_the_environment() {
        let mut a = Allocator::new(slots(&[4]), 0, vec!["0".into(), "0".into(), "1".into()]);
        let g1 = a.grant(&req(1, 0, 2)).unwrap();
        assert_eq!(g1.accelerators, ["0", "0"]);
        let g2 = a.grant(&req(2, 0, 1)).unwrap();
        a.release(&g1);
        assert_eq!(a.free().gpus, 2, "released by index, not by name");
        let head: serde_json::Value = serde_json::from_slice(&g2.head()).unwrap();
        assert_eq!(head["cores"], 2);
        assert_eq!(head["cpus"], serde_json::json!([1, 2]));
        assert_eq!(head["env"]["CUDA_VISIBLE_DEVICES"], "1");
        assert_eq!(head["env"]["OMP_NUM_THREADS"], "2");
        assert_eq!(head["env"]["PARSL_GPUS"], "1");
        let none = a.grant(&req(1, 0, 0)).unwrap();
        let head: serde_json::Value = serde_json::from_slice(&none.head()).unwrap();
        assert_eq!(
            head["env"]["CUDA_VISIBLE_DEVICES"], "",
            "no GPU asked, none visible"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

        /// Grants never exceed the totals, never share a CPU or an accelerator, and every
        /// grant released gives the pool back exactly its totals.
        #[test]
        fn grants_never_overlap_or_exceed_and_all_come_back(
            numa in proptest::collection::vec(1u32..6, 1..4),
            gpus in 0usize..4,
            ops in proptest::collection::vec((0u32..7, 0u64..400, 0u32..3, any::<bool>()), 1..60),
        ) {
            let mut a = Allocator::new(slots(&numa), 1000, (0..gpus).map(|i| i.to_string()).collect());
            let totals = a.totals();
            let mut held: Vec<Grant> = Vec::new();
            for (cores, memory, g, release) in ops {
                if release && !held.is_empty() {
                    let g = held.remove(cores as usize % held.len());
                    a.release(&g);
                } else if let Some(grant) = a.grant(&req(cores, memory, g)) {
                    prop_assert_eq!(grant.cpus.len(), cores as usize);
                    prop_assert_eq!(grant.accelerators.len(), g as usize);
                    held.push(grant);
                }
                let used = held.iter().fold(Resources::default(), |u, g| u.plus(&g.request));
                prop_assert!(used.fits(&totals));
                prop_assert_eq!(a.free(), totals.minus(&used));
                let mut cpus: Vec<usize> = held.iter().flat_map(|g| g.slots.clone()).collect();
                let n = cpus.len();
                cpus.sort_unstable();
                cpus.dedup();
                prop_assert_eq!(cpus.len(), n, "a CPU slot granted twice");
                let mut acc: Vec<String> = held.iter().flat_map(|g| g.accelerators.clone()).collect();
                let n = acc.len();
                acc.sort();
                acc.dedup();
                prop_assert_eq!(acc.len(), n, "an accelerator granted twice");
            }
            for g in held.drain(..) {
                a.release(&g);
            }
            prop_assert_eq!(a.free(), totals);
        }
    }
}
