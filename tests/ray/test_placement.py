"""Where replicas go, as plain rules: no cluster, and no ray needed."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from limner import KeyStats, MemoryExhausted, ModelSettings, Pool
from limner.errors import InvalidInput
from limner.ray import GPU_MB, NoRoomInCluster, RayKeyOptions, RayRuntime, ReplicaResources
from limner.ray._placement import check_fits, fits, replica_resources
from limner.ray._usage import AppUsage, ReplicaReport, app_usage
from limner.testing import fake_embedding_spec

from .conftest import fake_registry

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


def test_a_node_fits_a_need_when_it_has_each_resource() -> None:
    assert fits({"CPU": 1}, {"CPU": 1.0, "memory": 0.0})
    assert not fits({"CPU": 1, GPU_MB: 10}, {"CPU": 4.0})


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("stream_window", -1),
        ("deploy_timeout", 0),
        ("room_timeout", -1),
        ("refresh_interval", 0),
        ("min_hold", -1),
        ("health_interval", 0),
        ("control_plane_timeout", -1),
    ],
)
def test_a_bad_runtime_setting_is_refused_naming_its_field(setting: str, value: float) -> None:
    with pytest.raises(InvalidInput) as caught:
        RayRuntime(**{setting: value})  # type: ignore[arg-type]
    assert caught.value.field == setting


async def pool_stats(*calls: int) -> KeyStats:
    """The fake embedder's figures in a pool after calls of that many texts each."""
    model = fake_registry().embedder("fake/embedder")
    async with Pool() as pool:
        for count in calls:
            await model.using(pool).embed_text(["a fox"] * count)
        return pool.stats()["fake/embedder"]


@pytest.mark.anyio
async def test_the_board_sums_an_application_s_replicas() -> None:
    """Batches and resources add up, the batch size is weighted by batches, the latest use
    counts, and one busy replica makes its application busy."""
    one = ReplicaReport("limner:a", "r1", 0, await pool_stats(1, 1), 10.0, {"CPU": 1.0})
    two = ReplicaReport("limner:a", "r2", 1, await pool_stats(4), 20.0, {"CPU": 1.0})
    fresh = ReplicaReport("limner:b", "r3", 0, None, None, {"CPU": 0.5})
    usage = app_usage([one, two, fresh])
    assert usage["limner:a"] == AppUsage(
        app="limner:a",
        replicas=2,
        busy=True,
        last_used=20.0,
        resources={"CPU": 2.0},
        batches=3,
        mean_batch_size=2.0,
        queue_depth=0,
    )
    assert (usage["limner:b"].busy, usage["limner:b"].last_used) == (False, None)


def test_the_board_says_since_when_an_application_holds_room_and_when_it_was_seen_busy() -> None:
    rows = [
        ReplicaReport("limner:a", "r1", 1, None, 5.0, started=100.0, reported=130.0),
        ReplicaReport("limner:a", "r2", 2, None, 6.0, started=110.0, reported=131.0),
        ReplicaReport("limner:a", "r3", 0, None, 7.0, started=90.0, reported=140.0),
        ReplicaReport("limner:b", "r4", 0, None, 7.0, started=120.0, reported=141.0),
    ]
    usage = app_usage(rows)
    assert (usage["limner:a"].held_since, usage["limner:a"].busy_reported) == (90.0, 131.0)
    assert (usage["limner:b"].held_since, usage["limner:b"].busy_reported) == (120.0, None)
