//! `cpu_affinity` strategies. `none`, `block`, `block-reverse`, `alternating` and
//! `list:` follow Parsl exactly (indices into the sorted allowed CPUs; `list:` names
//! absolute CPU ids). `topology` is ours: whole physical cores per worker, kept inside
//! one NUMA node whenever the counts allow.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::cpulist::{self, CpuListError};
use super::topology::Topology;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    None,
    Block,
    BlockReverse,
    Alternating,
    /// Absolute CPU ids, one entry per worker rank.
    List(Vec<Vec<u32>>),
    Topology,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    Unknown(String),
    BadList {
        value: String,
        error: CpuListError,
    },
    EmptyList(String),
    Overlap {
        value: String,
        cpu: u32,
        first: usize,
        second: usize,
    },
    ListRanks {
        value: String,
        given: usize,
        workers: usize,
    },
    MoreWorkersThanCpus {
        workers: usize,
        cpus: usize,
    },
    NotAllowed {
        cpu: u32,
        allowed: String,
    },
    Accelerators {
        workers: usize,
        accelerators: usize,
    },
    NoWorkers,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Unknown(v) => write!(
                f,
                "cpu_affinity {v:?} is not supported; use one of none, block, block-reverse, alternating, \
                 topology, or 'list:<cpus of worker 0>:<cpus of worker 1>:...'"
            ),
            PlanError::BadList { value, error } => write!(f, "cpu_affinity {value:?}: {error}"),
            PlanError::EmptyList(v) => write!(
                f,
                "cpu_affinity {v:?}: write 'list:' followed by one CPU list per worker, separated by ':' \
                 (e.g. 'list:0-3:4-7')"
            ),
            PlanError::Overlap { value, cpu, first, second } => write!(
                f,
                "cpu_affinity {value:?}: CPU {cpu} is given to worker {first} and worker {second}; \
                 give each worker its own CPUs"
            ),
            PlanError::ListRanks { value, given, workers } => write!(
                f,
                "cpu_affinity {value:?} names {given} worker ranks but this node runs {workers} workers; \
                 give one rank per worker (or set max_workers_per_node={given})"
            ),
            PlanError::MoreWorkersThanCpus { workers, cpus } => write!(
                f,
                "cpu affinity cannot pin {workers} workers to {cpus} allowed CPUs; lower max_workers_per_node \
                 to at most {cpus} or use cpu_affinity='none'"
            ),
            PlanError::NotAllowed { cpu, allowed } => write!(
                f,
                "cpu_affinity names CPU {cpu}, which this process may not use (allowed: {allowed}); \
                 use CPUs from the allowed set"
            ),
            PlanError::Accelerators { workers, accelerators } => write!(
                f,
                "{workers} workers but only {accelerators} available_accelerators; each worker needs one entry"
            ),
            PlanError::NoWorkers => write!(f, "a pool needs at least one worker"),
        }
    }
}

impl std::error::Error for PlanError {}

impl Strategy {
    /// Parse Parsl's `cpu_affinity` string (case-insensitive, as Parsl lower-cases it).
    pub fn parse(value: &str) -> Result<Strategy, PlanError> {
        let v = value.trim().to_ascii_lowercase();
        Ok(match v.as_str() {
            "none" => Strategy::None,
            "block" => Strategy::Block,
            "block-reverse" => Strategy::BlockReverse,
            "alternating" => Strategy::Alternating,
            "topology" => Strategy::Topology,
            _ if v.starts_with("list") => {
                let ranks: Vec<&str> = v.split(':').skip(1).collect();
                if ranks.is_empty() || ranks.iter().any(|r| r.is_empty()) || !v.starts_with("list:")
                {
                    return Err(PlanError::EmptyList(value.to_string()));
                }
                let mut lists = Vec::with_capacity(ranks.len());
                let mut owner: HashMap<u32, usize> = HashMap::new();
                for (i, r) in ranks.iter().enumerate() {
                    let cpus = cpulist::parse(r).map_err(|error| PlanError::BadList {
                        value: value.to_string(),
                        error,
                    })?;
                    if cpus.is_empty() {
                        return Err(PlanError::EmptyList(value.to_string()));
                    }
                    for &c in &cpus {
                        if let Some(&first) = owner.get(&c) {
                            return Err(PlanError::Overlap {
                                value: value.to_string(),
                                cpu: c,
                                first,
                                second: i,
                            });
                        }
                        owner.insert(c, i);
                    }
                    lists.push(cpus);
                }
                Strategy::List(lists)
            }
            _ => return Err(PlanError::Unknown(value.to_string())),
        })
    }

    /// Checks that need only the configuration: the strategy parses and a `list:`
    /// has one rank per worker when the worker count is known.
    pub fn validate(value: &str, workers: Option<usize>) -> Result<Strategy, PlanError> {
        let s = Strategy::parse(value)?;
        if let (Strategy::List(ranks), Some(w)) = (&s, workers) {
            if ranks.len() != w {
                return Err(PlanError::ListRanks {
                    value: value.to_string(),
                    given: ranks.len(),
                    workers: w,
                });
            }
        }
        Ok(s)
    }

    /// CPUs of each worker rank; `None` entries mean "not pinned" (strategy `none`).
    pub fn assign(
        &self,
        allowed: &[u32],
        topo: &Topology,
        workers: usize,
    ) -> Result<Vec<Option<Vec<u32>>>, PlanError> {
        if workers == 0 {
            return Err(PlanError::NoWorkers);
        }
        let mut avail = allowed.to_vec();
        avail.sort_unstable();
        avail.dedup();
        if let Strategy::None = self {
            return Ok(vec![None; workers]);
        }
        if let Strategy::List(ranks) = self {
            if ranks.len() != workers {
                return Err(PlanError::ListRanks {
                    value: "list:...".into(),
                    given: ranks.len(),
                    workers,
                });
            }
            for &c in ranks.iter().flatten() {
                if avail.binary_search(&c).is_err() {
                    return Err(PlanError::NotAllowed {
                        cpu: c,
                        allowed: cpulist::format(&avail),
                    });
                }
            }
            return Ok(ranks.iter().cloned().map(Some).collect());
        }
        let cpw = avail.len() / workers;
        if cpw == 0 {
            return Err(PlanError::MoreWorkersThanCpus {
                workers,
                cpus: avail.len(),
            });
        }
        Ok(match self {
            Strategy::Block => (0..workers)
                .map(|i| Some(avail[cpw * i..cpw * (i + 1)].to_vec()))
                .collect(),
            Strategy::BlockReverse => (0..workers)
                .map(|i| {
                    let slot = workers - 1 - i;
                    Some(avail[cpw * slot..cpw * (slot + 1)].to_vec())
                })
                .collect(),
            Strategy::Alternating => (0..workers)
                .map(|i| Some(avail.iter().skip(i).step_by(workers).copied().collect()))
                .collect(),
            Strategy::Topology => topology_aware(&avail, topo, workers, cpw)
                .into_iter()
                .map(Some)
                .collect(),
            Strategy::None | Strategy::List(_) => unreachable!(),
        })
    }
}

/// Whole physical cores per worker, inside one NUMA node where the counts allow.
fn topology_aware(avail: &[u32], topo: &Topology, workers: usize, cpw: usize) -> Vec<Vec<u32>> {
    // Allowed CPUs grouped by core, cores ordered by (NUMA node, package, die, core).
    let mut cores: BTreeMap<(u32, u32, u32, u32), Vec<u32>> = BTreeMap::new();
    for &id in avail {
        let (numa, key) = topo
            .get(id)
            .map_or((0, (0, 0, id)), |c| (c.numa, c.core_key()));
        cores
            .entry((numa, key.0, key.1, key.2))
            .or_default()
            .push(id);
    }
    let ordered: Vec<(u32, Vec<u32>)> = cores.into_iter().map(|(k, v)| (k.0, v)).collect();
    if ordered.len() < workers {
        // Fewer cores than workers: share cores, but keep siblings next to each other.
        let threads: Vec<u32> = ordered.into_iter().flat_map(|(_, v)| v).collect();
        return (0..workers)
            .map(|i| sorted(threads[cpw * i..cpw * (i + 1)].to_vec()))
            .collect();
    }
    let per = ordered.len() / workers;
    let mut by_node: BTreeMap<u32, Vec<&Vec<u32>>> = BTreeMap::new();
    for (numa, cpus) in &ordered {
        by_node.entry(*numa).or_default().push(cpus);
    }
    let fits: usize = by_node.values().map(|c| c.len() / per).sum();
    let mut out = Vec::with_capacity(workers);
    if fits >= workers {
        'nodes: for node_cores in by_node.values() {
            for chunk in node_cores.chunks_exact(per) {
                if out.len() == workers {
                    break 'nodes;
                }
                out.push(sorted(
                    chunk.iter().flat_map(|c| c.iter().copied()).collect(),
                ));
            }
        }
    } else {
        for i in 0..workers {
            out.push(sorted(
                ordered[per * i..per * (i + 1)]
                    .iter()
                    .flat_map(|(_, c)| c.iter().copied())
                    .collect(),
            ));
        }
    }
    out
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(n: u32) -> (Vec<u32>, Topology) {
        ((0..n).collect(), Topology::synthetic(1, n, 1, 1))
    }

    fn assign(s: &str, allowed: &[u32], topo: &Topology, w: usize) -> Vec<Vec<u32>> {
        Strategy::parse(s)
            .unwrap()
            .assign(allowed, topo, w)
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect()
    }

    #[test]
    fn parsl_strategies_match_parsl() {
        let (a, t) = flat(5);
        assert_eq!(assign("block", &a, &t, 2), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(
            assign("block-reverse", &a, &t, 2),
            vec![vec![2, 3], vec![0, 1]]
        );
        assert_eq!(
            assign("alternating", &a, &t, 2),
            vec![vec![0, 2, 4], vec![1, 3]]
        );
        assert_eq!(assign("LIST:0-1:3", &a, &t, 2), vec![vec![0, 1], vec![3]]);
        assert_eq!(
            Strategy::parse("none").unwrap().assign(&a, &t, 3).unwrap(),
            vec![None, None, None]
        );
    }

    #[test]
    fn restricted_masks_index_into_the_allowed_cpus() {
        let t = Topology::synthetic(1, 16, 1, 1);
        assert_eq!(
            assign("block", &[3, 5, 9, 12], &t, 2),
            vec![vec![3, 5], vec![9, 12]]
        );
        let err = Strategy::parse("list:0:1")
            .unwrap()
            .assign(&[3, 5], &t, 2)
            .unwrap_err();
        assert!(err.to_string().contains("CPU 0") && err.to_string().contains("3,5"));
    }

    #[test]
    fn errors_say_what_to_write() {
        assert!(matches!(
            Strategy::parse("blocky"),
            Err(PlanError::Unknown(_))
        ));
        assert!(matches!(
            Strategy::parse("list:"),
            Err(PlanError::EmptyList(_))
        ));
        assert!(matches!(
            Strategy::parse("list:0-1:1-2"),
            Err(PlanError::Overlap { cpu: 1, .. })
        ));
        assert!(matches!(
            Strategy::parse("list:3-1"),
            Err(PlanError::BadList { .. })
        ));
        assert!(matches!(
            Strategy::validate("list:0:1", Some(4)),
            Err(PlanError::ListRanks {
                given: 2,
                workers: 4,
                ..
            })
        ));
        let (a, t) = flat(2);
        let e = Strategy::Block.assign(&a, &t, 3).unwrap_err();
        assert!(e.to_string().contains("max_workers_per_node"));
    }

    #[test]
    fn topology_keeps_whole_cores_and_numa_nodes() {
        // 2 packages x 4 cores x 2 threads, 1 NUMA node per package; CPU n and n+8 are siblings.
        let t = Topology::synthetic(2, 4, 2, 1);
        let a: Vec<u32> = (0..16).collect();
        let plan = assign("topology", &a, &t, 4);
        assert_eq!(
            plan,
            vec![
                vec![0, 1, 8, 9],
                vec![2, 3, 10, 11],
                vec![4, 5, 12, 13],
                vec![6, 7, 14, 15]
            ]
        );
        // 3 workers over 2 NUMA nodes of 4 cores: 2 cores each, none straddles a node.
        let plan = assign("topology", &a, &t, 3);
        for w in &plan {
            let nodes: std::collections::BTreeSet<u32> =
                w.iter().map(|c| t.get(*c).unwrap().numa).collect();
            assert_eq!(nodes.len(), 1, "{w:?} crosses NUMA nodes");
            assert_eq!(w.len(), 4);
        }
        // More workers than cores: siblings stay adjacent.
        let plan = assign("topology", &a, &t, 16);
        assert_eq!(plan[0], vec![0]);
        assert_eq!(plan[1], vec![8]);
    }
}
