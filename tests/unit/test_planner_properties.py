"""Property tests of the Rust affinity planner (hypothesis), with a differential test
against a plain-Python model of Parsl's rules (tests/support/parsl_affinity_model.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from htex_rs import _core
from support.parsl_affinity_model import parsl_worker_cpus

pytestmark = pytest.mark.timeout(300)
PARSL_STRATEGIES = ["block", "block-reverse", "alternating"]

cpu_sets = st.sets(st.integers(min_value=0, max_value=511), min_size=1, max_size=160).map(sorted)


def plan(strategy, workers, allowed, **kw):
    synthetic = kw.pop("synthetic", None) or (1, 512, 1, 1)
    return _core.plan_pool(strategy, workers, allowed=allowed, synthetic=synthetic, **kw)


@settings(max_examples=300, deadline=None)
@given(allowed=cpu_sets, strategy=st.sampled_from(PARSL_STRATEGIES + ["topology"]), data=st.data())
def test_sets_are_disjoint_subsets_sized_as_parsl_sizes_them(allowed, strategy, data):
    workers = data.draw(st.integers(min_value=1, max_value=len(allowed)))
    p = plan(strategy, workers, allowed)
    assert [w["rank"] for w in p] == list(range(workers))
    seen: set[int] = set()
    for w in p:
        cpus = set(w["cpus"])
        assert cpus <= set(allowed)
        assert not cpus & seen, "workers share a CPU"
        seen |= cpus
        cpw = len(allowed) // workers
        if strategy == "alternating":
            assert len(cpus) in (cpw, cpw + 1)
        elif strategy != "topology":
            assert len(cpus) == cpw
        assert w["env"]["OMP_NUM_THREADS"] == str(len(cpus))
        assert w["env"]["GOMP_CPU_AFFINITY"] == ",".join(map(str, w["cpus"]))


@settings(max_examples=300, deadline=None)
@given(allowed=cpu_sets, data=st.data())
def test_block_reverse_mirrors_block(allowed, data):
    workers = data.draw(st.integers(min_value=1, max_value=len(allowed)))
    block = [w["cpus"] for w in plan("block", workers, allowed)]
    rev = [w["cpus"] for w in plan("block-reverse", workers, allowed)]
    assert rev == block[::-1]


@settings(max_examples=300, deadline=None)
@given(ranks=st.lists(st.sets(st.integers(0, 300), min_size=1, max_size=12), min_size=1, max_size=8))
def test_list_round_trips(ranks):
    used: set[int] = set()
    disjoint = []
    for r in ranks:
        r = r - used
        if r:
            disjoint.append(sorted(r))
            used |= r
    value = "list:" + ":".join(_core.format_cpu_list(r) for r in disjoint)
    p = plan(value, len(disjoint), sorted(used))
    assert [w["cpus"] for w in p] == disjoint
    for r in disjoint:
        assert _core.parse_cpu_list(_core.format_cpu_list(r)) == r


@settings(max_examples=500, deadline=None)
@given(allowed=cpu_sets, strategy=st.sampled_from(PARSL_STRATEGIES + ["none"]), data=st.data())
def test_differential_against_parsls_rules(allowed, strategy, data):
    workers = data.draw(st.integers(min_value=1, max_value=len(allowed) + 2))
    try:
        expected = [parsl_worker_cpus(strategy, r, workers, allowed) for r in range(workers)]
    except AssertionError:
        with pytest.raises(ValueError, match="cannot pin"):
            plan(strategy, workers, allowed)
        return
    assert [w["cpus"] for w in plan(strategy, workers, allowed)] == expected


@settings(max_examples=200, deadline=None)
@given(packages=st.integers(1, 4), cores=st.sampled_from([2, 4, 8, 16]), threads=st.integers(1, 2),
       numa=st.sampled_from([1, 2]), data=st.data())
def test_topology_strategy_keeps_whole_cores_and_numa_nodes(packages, cores, threads, numa, data):
    total_cores = packages * cores
    workers = data.draw(st.integers(1, total_cores))
    p = plan("topology", workers, None, synthetic=(packages, cores, threads, numa))
    per = total_cores // workers
    for w in p:
        assert len(w["cores"]) == per, "a worker got part of a core or an uneven share"
        assert len(w["cpus"]) == per * threads, "SMT siblings were split"
        nodes_per_worker_fit = sum((cores // numa) // per for _ in range(packages * numa)) >= workers
        if nodes_per_worker_fit:
            assert len(w["numa_nodes"]) == 1, f"{w} crosses NUMA nodes although the counts allow it"


@given(text=st.text(alphabet="0123456789,-: ", max_size=20))
def test_cpu_list_parser_never_crashes(text):
    try:
        cpus = _core.parse_cpu_list(text)
    except ValueError as e:
        assert "CPU list" in str(e)
    else:
        assert cpus == sorted(set(cpus))
