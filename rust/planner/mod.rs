//! The CPU-affinity and accelerator planner: a pure function of (allowed CPUs,
//! topology, worker count, strategy, accelerators) giving each worker its CPUs,
//! physical cores, NUMA nodes, accelerator and environment. The worker pool applies
//! the plan; the executor validates the strategy at construction; `htex-rs plan`
//! prints it.

pub mod cpulist;
pub mod strategies;
pub mod topology;

use std::collections::BTreeSet;

pub use strategies::{PlanError, Strategy};
pub use topology::Topology;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    pub rank: usize,
    /// `None`: not pinned (strategy `none`).
    pub cpus: Option<Vec<u32>>,
    /// Physical cores `(package, die, core)` the CPUs belong to.
    pub cores: Vec<(u32, u32, u32)>,
    pub numa_nodes: Vec<u32>,
    pub accelerator: Option<String>,
    pub env: Vec<(String, String)>,
}

/// OpenMP variables Parsl sets beside `sched_setaffinity`.
#[must_use]
pub fn affinity_env(cpus: &[u32]) -> Vec<(String, String)> {
    let joined = cpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    vec![
        ("OMP_NUM_THREADS".into(), cpus.len().to_string()),
        ("GOMP_CPU_AFFINITY".into(), joined.clone()),
        (
            "KMP_AFFINITY".into(),
            format!("explicit,proclist=[{joined}]"),
        ),
    ]
}

/// Device variables for one worker, as Parsl sets them. With `num_gpus` known
/// (`/proc/driver/nvidia/gpus`, or an explicit count), integer accelerator names are
/// folded onto the physical GPUs: 32 entries on 4 GPUs put workers 0-7 on GPU 0.
#[must_use]
pub fn accelerator_env(
    accelerator: &str,
    pool_size: usize,
    num_gpus: Option<usize>,
) -> Vec<(String, String)> {
    let cuda = match (num_gpus, accelerator.parse::<usize>()) {
        (Some(n), Ok(idx)) if n > 0 && pool_size / n > 0 => (idx / (pool_size / n)).to_string(),
        _ => accelerator.to_string(),
    };
    vec![
        ("CUDA_VISIBLE_DEVICES".into(), cuda),
        ("ROCR_VISIBLE_DEVICES".into(), accelerator.to_string()),
        ("ZE_AFFINITY_MASK".into(), accelerator.to_string()),
        ("ZE_ENABLE_PCI_ID_DEVICE_ORDER".into(), "1".into()),
    ]
}

/// Plan a pool of `workers` workers.
pub fn plan(
    strategy: &Strategy,
    allowed: &[u32],
    topo: &Topology,
    workers: usize,
    accelerators: &[String],
    num_gpus: Option<usize>,
) -> Result<Vec<WorkerPlan>, PlanError> {
    if !accelerators.is_empty() && workers > accelerators.len() {
        return Err(PlanError::Accelerators {
            workers,
            accelerators: accelerators.len(),
        });
    }
    let gpus = num_gpus.or(topo.nvidia_gpus).filter(|&n| n > 0);
    let assigned = strategy.assign(allowed, topo, workers)?;
    Ok(assigned
        .into_iter()
        .enumerate()
        .map(|(rank, cpus)| {
            let shown: Vec<u32> = cpus.clone().unwrap_or_else(|| allowed.to_vec());
            let cores: BTreeSet<(u32, u32, u32)> = shown
                .iter()
                .map(|c| topo.get(*c).map_or((0, 0, *c), topology::Cpu::core_key))
                .collect();
            let numa: BTreeSet<u32> = shown
                .iter()
                .map(|c| topo.get(*c).map_or(0, |x| x.numa))
                .collect();
            let accelerator = accelerators.get(rank).cloned();
            let mut env = cpus.as_deref().map(affinity_env).unwrap_or_default();
            if let Some(a) = &accelerator {
                env.extend(accelerator_env(a, workers, gpus));
            }
            WorkerPlan {
                rank,
                cpus,
                cores: cores.into_iter().collect(),
                numa_nodes: numa.into_iter().collect(),
                accelerator,
                env,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(p: &'a WorkerPlan, k: &str) -> Option<&'a str> {
        p.env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn plan_carries_openmp_and_device_variables() {
        let topo = Topology::synthetic(1, 4, 1, 1);
        let accs: Vec<String> = vec!["0".into(), "1".into()];
        let p = plan(&Strategy::Block, &[0, 1, 2, 3], &topo, 2, &accs, None).unwrap();
        assert_eq!(p[1].cpus, Some(vec![2, 3]));
        assert_eq!(env(&p[1], "OMP_NUM_THREADS"), Some("2"));
        assert_eq!(env(&p[1], "GOMP_CPU_AFFINITY"), Some("2,3"));
        assert_eq!(env(&p[1], "KMP_AFFINITY"), Some("explicit,proclist=[2,3]"));
        assert_eq!(env(&p[1], "CUDA_VISIBLE_DEVICES"), Some("1"));
        assert_eq!(env(&p[1], "ZE_ENABLE_PCI_ID_DEVICE_ORDER"), Some("1"));
        let none = plan(&Strategy::None, &[0, 1, 2, 3], &topo, 2, &[], None).unwrap();
        assert!(none[0].env.is_empty() && none[0].cpus.is_none());
    }

    #[test]
    fn gpu_oversubscription_folds_onto_physical_gpus() {
        let topo = Topology::synthetic(1, 32, 1, 1);
        let accs: Vec<String> = (0..32).map(|i| i.to_string()).collect();
        let allowed: Vec<u32> = (0..32).collect();
        let p = plan(&Strategy::None, &allowed, &topo, 32, &accs, Some(4)).unwrap();
        let cuda: Vec<&str> = p
            .iter()
            .map(|w| env(w, "CUDA_VISIBLE_DEVICES").unwrap())
            .collect();
        assert_eq!(&cuda[..9], &["0", "0", "0", "0", "0", "0", "0", "0", "1"]);
        assert_eq!(cuda[31], "3");
        assert_eq!(env(&p[31], "ROCR_VISIBLE_DEVICES"), Some("31"));
        // Names that are not integers, and multi-device entries, pass through unchanged.
        let accs: Vec<String> = vec!["0,1".into(), "GPU-abc".into()];
        let p = plan(&Strategy::None, &allowed, &topo, 2, &accs, Some(4)).unwrap();
        assert_eq!(env(&p[0], "CUDA_VISIBLE_DEVICES"), Some("0,1"));
        assert_eq!(env(&p[1], "CUDA_VISIBLE_DEVICES"), Some("GPU-abc"));
    }

    #[test]
    fn workers_are_capped_by_accelerators() {
        let topo = Topology::synthetic(1, 4, 1, 1);
        let accs: Vec<String> = vec!["0".into()];
        assert!(matches!(
            plan(&Strategy::None, &[0, 1], &topo, 2, &accs, None),
            Err(PlanError::Accelerators {
                workers: 2,
                accelerators: 1
            })
        ));
    }

    #[test]
    fn plan_reports_cores_and_numa_nodes() {
        let topo = Topology::synthetic(2, 2, 2, 1); // 8 CPUs, siblings n / n+4
        let allowed: Vec<u32> = (0..8).collect();
        let p = plan(&Strategy::Topology, &allowed, &topo, 2, &[], None).unwrap();
        assert_eq!(p[0].cpus, Some(vec![0, 1, 4, 5]));
        assert_eq!(p[0].cores, vec![(0, 0, 0), (0, 0, 1)]);
        assert_eq!(p[1].numa_nodes, vec![1]);
    }
}
