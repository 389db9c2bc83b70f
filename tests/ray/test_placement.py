"""Where replicas go, as plain rules: no cluster, and no ray needed."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from limner import MemoryExhausted, ModelSettings
from limner.ray import GPU_MB, NoRoomInCluster, RayKeyOptions, ReplicaResources
from limner.ray._placement import check_fits, fits, least_recently_used, replica_resources
from limner.testing import fake_embedding_spec

MIB = 1024 * 1024
SPEC = fake_embedding_spec("fake/embedder", memory_mb=3000)


def test_importing_limner_ray_imports_no_ray() -> None:
    code = (
        "import sys, limner.ray; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"


def test_a_cpu_replica_asks_for_whole_cores_and_the_spec_s_memory() -> None:
    resources = replica_resources(SPEC, ModelSettings(weights="w"), RayKeyOptions())
    assert resources == ReplicaResources(num_cpus=1, num_gpus=0.0, memory_mb=3000)
    assert resources.ray_actor_options() == {"num_cpus": 1, "num_gpus": 0.0, "memory": 3000 * MIB}
    assert resources.as_ray() == {"CPU": 1, "memory": 3000 * MIB}


def test_a_gpu_replica_asks_for_a_gpu_and_its_megabytes_where_nodes_declare_them() -> None:
    cuda = ModelSettings(weights="w", device="cuda")
    plain = replica_resources(SPEC, cuda, RayKeyOptions())
    assert plain.as_ray() == {"CPU": 1, "GPU": 1.0}
    counted = replica_resources(SPEC, cuda, RayKeyOptions(), cluster_has_gpu_mb=True)
    assert counted.as_ray() == {"CPU": 1, "GPU": 1.0, GPU_MB: 3000}
    assert counted.ray_actor_options()["resources"] == {GPU_MB: 3000}
    shared = replica_resources(
        SPEC, cuda, RayKeyOptions(num_gpus=0.5, memory_mb=2000), cluster_has_gpu_mb=True
    )
    assert shared.as_ray() == {"CPU": 1, "GPU": 0.5, GPU_MB: 2000}


def test_keep_alive_and_replicas_become_serve_s_autoscaling() -> None:
    config = RayKeyOptions(min_replicas=0, max_replicas=3, keep_alive=60).autoscaling_config()
    assert config["min_replicas"] == 0 and config["max_replicas"] == 3
    assert config["initial_replicas"] == 1  # whoever deployed the key is waiting for one
    assert config["downscale_to_zero_delay_s"] == config["downscale_delay_s"] == 60
    assert config["look_back_period_s"] > config["metrics_interval_s"]
    assert (
        RayKeyOptions(min_replicas=2, max_replicas=2).autoscaling_config()["initial_replicas"] == 2
    )
    with pytest.raises(ValueError, match="min_replicas"):
        RayKeyOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="not options of Pool"):
        RayKeyOptions(pool_options={"max_qeue": 4})


def test_no_node_large_enough_names_the_short_resource_need_and_largest_room() -> None:
    nodes = [{"CPU": 2.0, "memory": 8000 * MIB}, {"CPU": 8.0, "memory": 4000 * MIB}]
    check_fits("k", {"CPU": 2, "memory": 6000 * MIB}, nodes, busy=False)  # the first node
    with pytest.raises(NoRoomInCluster) as caught:
        check_fits("k", {"CPU": 1, "memory": 9000 * MIB}, nodes, busy=False)
    error = caught.value
    assert isinstance(error, MemoryExhausted)
    assert (error.resource, error.need, error.largest) == ("memory", 9000, 8000)
    assert (error.need_mb, error.available_mb) == (9000, 8000)
    assert "needs 9,000 MB of memory, the largest node has 8,000 MB" in str(error)
    # Each resource fits some node, never both on one: the roomiest node's lack is named.
    with pytest.raises(NoRoomInCluster, match="needs 4 CPU, the largest node has 2 CPU"):
        check_fits("k", {"CPU": 4, "memory": 6000 * MIB}, nodes, busy=False)
    with pytest.raises(NoRoomInCluster, match="needs 1 GPU, the most any node has free now is 0"):
        check_fits("k", {"GPU": 1}, nodes, busy=True)


def test_the_placement_error_pickles_with_its_fields() -> None:
    error = NoRoomInCluster(
        "k", resource="CPU", need=3, largest=2, need_mb=100, available_mb=50, busy=True
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is NoRoomInCluster and str(copy) == str(error)
    assert (copy.key, copy.resource, copy.need, copy.largest, copy.busy) == ("k", "CPU", 3, 2, True)


def test_the_least_recently_used_idle_key_gives_its_room_up_first() -> None:
    assert least_recently_used([("a", 30.0), ("b", 10.0), ("c", 20.0)]) == "b"
    assert least_recently_used([]) is None
    assert fits({"CPU": 1}, {"CPU": 1.0, "memory": 0.0})
    assert not fits({"CPU": 1, GPU_MB: 10}, {"CPU": 4.0})
