"""ParallelContext on real gloo processes: every rank's answers checked against the pure layout."""

from __future__ import annotations

import copy
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import yaml

import lightning_parallelctx.distributed

from lightning_parallelctx import ParallelConfigError, ParallelContext, ParallelMode, ProcessGroupInitializer
from lightning_parallelctx.initializers import _COMPOSITES, register_mode, unregister_mode
from lightning_parallelctx.process_groups import MAX_GROUP_NAME_LEN, short_group_name
from lightning_parallelctx.testing import RankFailure, openmpi_env, slurm_env, spawn

SIZES = ("tensor", "pipeline", "sequence", "expert", "data")


def _verify(ctx: ParallelContext) -> dict:
    """Every query for every mode against the pure layout, plus an all-reduce on every group."""
    rank, layout = dist.get_rank(), ctx.layout
    assert ctx.global_rank == ctx.get_global_rank() == rank
    for mode, axes in _COMPOSITES.items():
        expected = list(layout.group_of(rank, axes)) if axes else list(range(layout.world_size))
        assert ctx.get_ranks_in_group(mode) == expected, mode
        assert ctx.get_world_size(mode) == len(expected)
        assert ctx.get_local_rank(mode) == expected.index(rank)
        i = expected.index(rank)
        assert ctx.get_next_global_rank(mode) == expected[(i + 1) % len(expected)]
        assert ctx.get_prev_global_rank(mode) == expected[(i - 1) % len(expected)]
        assert ctx.is_first_rank(mode) == (i == 0) and ctx.is_last_rank(mode) == (i == len(expected) - 1)
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=ctx.get_group(mode))
        assert value.item() == sum(expected), (mode, value.item(), expected)
    for axis, short in zip(SIZES, ("tp", "pp", "sp", "ep", "dp")):
        assert getattr(ctx, f"{short}_rank") == ctx.get_local_rank(axis) == layout.coords(rank)[axis]
        assert ctx.get_local_rank(ParallelMode(axis)) == ctx.get_local_rank(axis)  # enum == string
    return {"repr": repr(ctx), "calls": ctx.new_group_calls}


def _build_and_verify(rank: int, world: int, spec: dict) -> dict:
    ctx = ParallelContext.from_torch(**spec, timeout=60)
    out = _verify(ctx)
    ctx.destroy()
    return out


LAYOUTS_8 = {
    "tp2-pp2-dp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "tp2-sp2-dp2": dict(tensor_parallel_size=2, sequence_parallel_size=2),
    "tp2-ep2-dp2": dict(tensor_parallel_size=2, expert_parallel_size=2, data_parallel_size=2),
    "dp8": dict(),
    "tp2-pp2-order-dp-first": dict(tensor_parallel_size=2, pipeline_parallel_size=2, order="dp-tp-sp-ep-pp"),
    "tp2-sp2-ep2-order-pp-first": dict(tensor_parallel_size=2, sequence_parallel_size=2, expert_parallel_size=2,
                                       order="ep-sp-tp-dp-pp"),
}


@pytest.mark.parametrize("name", list(LAYOUTS_8))
def test_eight_processes(name):
    results = spawn(_build_and_verify, 8, LAYOUTS_8[name], timeout=120)
    assert len(results) == 8
    # A rank makes at most one call per mode with groups of 2..world-1 ranks, shared where identical.
    assert all(r["calls"] <= 6 for r in results)


def test_seed_example_and_repr():
    results = spawn(_build_and_verify, 4, dict(tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=2))
    assert [r["repr"] for r in results] == [
        f"ParallelContext(global_rank={g}, world_size=4, tp=2[rank={g % 2}], pp=1[rank=0], dp=2[rank={g // 2}], "
        f"sp=1[rank=0], ep=1[rank=0])"
        for g in range(4)
    ]


def _from_launcher(rank: int, world: int, which: str) -> str:
    build = {"slurm": ParallelContext.from_slurm, "openmpi": ParallelContext.from_openmpi,
             "env": ParallelContext.from_env}[which]
    ctx = build(tensor_parallel_size=2, timeout=60)
    _verify(ctx)
    launcher = ctx.launch.launcher
    ctx.destroy()
    return launcher


@pytest.mark.parametrize("which, env, launcher", [("slurm", slurm_env, "slurm"), ("openmpi", openmpi_env, "openmpi"),
                                                  ("env", slurm_env, "slurm"), ("env", openmpi_env, "openmpi")])
def test_from_launcher_variables(which, env, launcher):
    assert spawn(_from_launcher, 4, which, env=env) == [launcher] * 4


def _from_config(rank: int, world: int) -> str:
    ctx = ParallelContext.from_config({"tp": 2, "pp": 1, "dp": 2}, timeout=60)
    _verify(ctx)
    text = repr(ctx)
    ctx.destroy()
    return text


def test_from_config():
    assert "tp=2" in spawn(_from_config, 4)[0]


def _reuse_existing_world(rank: int, world: int) -> tuple[bool, bool]:
    dist.init_process_group("gloo")  # made by someone else (Lightning, the user)
    world_group = dist.group.WORLD
    ctx = ParallelContext.from_torch(tensor_parallel_size=2, timeout=60)
    _verify(ctx)
    same = ctx.get_group("global") is world_group
    assert ctx.get_local_rank() == rank  # from the launcher's variables, which describe this process
    ctx.destroy()
    # No launcher variables describe this process: the node-local rank is unknown, not guessed as 0.
    blind = ParallelContext.from_torch(tensor_parallel_size=2, timeout=60, env={})
    with pytest.raises(Exception, match="the rank on this node is unknown"):
        blind.get_local_rank()
    assert blind.get_local_rank("tensor") == rank % 2
    blind.destroy()
    return same, dist.is_initialized()  # the user's world outlives the context


def test_existing_default_group_is_reused_and_kept():
    assert spawn(_reuse_existing_world, 4) == [(True, True)] * 4


def _destroy_and_rebuild(rank: int, world: int) -> list:
    seen = []
    for spec in (dict(tensor_parallel_size=2), dict(tensor_parallel_size=4), dict(tensor_parallel_size=2)):
        ctx = ParallelContext.from_torch(**spec, timeout=30)
        _verify(ctx)
        seen.append(ctx.get_ranks_in_group("tensor"))
        ctx.destroy()
        ctx.destroy()  # twice is fine
        assert not dist.is_initialized()
        with pytest.raises(Exception, match="destroyed"):
            ctx.get_world_size("tensor")
    return seen


def test_build_destroy_build():
    results = spawn(_destroy_and_rebuild, 4, timeout=120)
    assert results[0] == [[0, 1], [0, 1, 2, 3], [0, 1]]


def _rebuild_in_user_world(rank: int, world: int) -> tuple[int, list[str]]:
    # With a world the user owns only the sub-groups go; same-rank groups must not meet stale keys.
    dist.init_process_group("gloo")
    names = []
    for _ in range(3):
        ctx = ParallelContext.from_torch(tensor_parallel_size=2, timeout=30)
        _verify(ctx)
        names += [ctx.get_group(m).group_name for m in ("tensor", "data")]
        ctx.destroy()
    return ctx.new_group_calls, names


def test_build_destroy_build_in_user_world():
    results = spawn(_rebuild_in_user_world, 4, timeout=120)
    # tensor + data + the one singleton group shared by the size-1 modes _verify asks for
    assert [calls for calls, _ in results] == [3] * 4
    for rank, (_, names) in enumerate(results):
        # A new name per build and group; short, so torch's flight recorder keeps none on the heap
        # per collective (process_groups.MAX_GROUP_NAME_LEN: longer names grew the heap every step).
        assert len(set(names)) == 6 and all(len(n) <= MAX_GROUP_NAME_LEN for n in names), names
        # Every member of a group knows it by the same name (it prefixes the group's store keys).
        partner = results[rank ^ 1][1]  # the other rank of this tensor group
        assert names[0::2] == partner[0::2]


def test_short_group_names():
    a = short_group_name("pctx1_", [0, 1])
    assert a == short_group_name("pctx1_", [0, 1]) and len(a) == MAX_GROUP_NAME_LEN and a.startswith("p")
    assert len({a, short_group_name("pctx2_", [0, 1]), short_group_name("pctx1_", [0, 2]),
                short_group_name("pctx1_", [10, 1])}) == 4


def _device_mesh(rank: int, world: int) -> dict:
    ctx = ParallelContext.from_torch(tensor_parallel_size=2, pipeline_parallel_size=2, timeout=60)
    calls_before = ctx.new_group_calls
    mesh = ctx.device_mesh
    assert mesh.mesh_dim_names == ("pp", "dp", "ep", "sp", "tp")
    for short, axis in (("tp", "tensor"), ("dp", "data"), ("pp", "pipeline")):
        assert dist.get_process_group_ranks(mesh[short].get_group()) == ctx.get_ranks_in_group(axis)
        assert mesh.get_local_rank(short) == ctx.get_local_rank(axis)
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = torch.arange(16.0).reshape(4, 4)
    dt = distribute_tensor(full, mesh["tp"], [Shard(0)])
    assert torch.equal(dt.to_local(), full.chunk(2, 0)[ctx.tp_rank])
    assert torch.equal(dt.redistribute(mesh["tp"], [Replicate()]).to_local(), full)
    out = {"extra_calls": ctx.new_group_calls - calls_before}
    ctx.destroy()
    return out


def test_device_mesh_view_uses_existing_groups():
    results = spawn(_device_mesh, 8, timeout=120)
    # Only the size-1 axes' shared singleton group is new: no O(world) init_device_mesh.
    assert all(r["extra_calls"] <= 1 for r in results)


# ------------------------------------------------------------------------------------ bad input
def _mismatched(rank: int, world: int) -> None:
    ParallelContext.from_torch(tensor_parallel_size=2 if rank < 2 else 4, timeout=30)


def test_different_sizes_on_different_ranks_fail_everywhere():
    with pytest.raises(RankFailure) as err:
        spawn(_mismatched, 4, timeout=90)
    assert sorted(err.value.errors) == [0, 1, 2, 3]
    for text in err.value.errors.values():
        assert "different parallel configurations" in text and "tp=4" in text and "tp=2" in text


def _bad_product(rank: int, world: int) -> None:
    ParallelContext.from_torch(tensor_parallel_size=2, data_parallel_size=3, timeout=30)


def test_sizes_not_multiplying_to_world_fail_on_every_rank():
    with pytest.raises(RankFailure) as err:
        spawn(_bad_product, 4, timeout=60)
    assert sorted(err.value.errors) == [0, 1, 2, 3]
    assert all("world size is 4" in t and "dp=2" in t for t in err.value.errors.values())


def _build_default(rank: int, world: int, timeout: float) -> None:
    ParallelContext.from_env(timeout=timeout)


def test_port_in_use_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RankFailure) as err:
            spawn(_build_default, 2, 5, extra_env={"MASTER_PORT": str(port)}, timeout=60)
    assert f"port {port} is already in use" in err.value.errors[0]
    assert "could not reach the rendezvous" in err.value.errors[1]  # bounded by the timeout, not a hang


def test_rank_that_never_arrives_times_out_everywhere():
    with pytest.raises(RankFailure) as err:
        spawn(_build_default, 4, 5, ranks_to_start=[0, 1, 2], timeout=60)
    assert sorted(err.value.errors) == [0, 1, 2]
    assert "not all 4 processes reached the rendezvous" in err.value.errors[0]


def test_mpi_without_address_is_a_clear_error():
    def no_address(rank, world, port):
        env = openmpi_env(rank, world, port)
        del env["MASTER_ADDR"], env["MASTER_PORT"]
        return env

    with pytest.raises(RankFailure) as err:
        spawn(_build_default, 2, 5, env=no_address, timeout=60)
    for text in err.value.errors.values():
        # one node: rank 0 is 127.0.0.1, but no job id to derive a port from, so the port is missing
        assert "no rendezvous port" in text and "MASTER_PORT" in text


def _unknown_mode(rank: int, world: int) -> str:
    ctx = ParallelContext.from_torch(timeout=30)
    try:
        ctx.get_group("tensr")
    except KeyError as err:
        return str(err)
    finally:
        ctx.destroy()
    return "no error"


def test_unknown_mode_lists_the_modes():
    text = spawn(_unknown_mode, 2)[0]
    assert "'tensr' does not exist" in text and "tensor" in text


# ------------------------------------------------------------------------------------ plug-in modes
class EvenOdd(ProcessGroupInitializer):
    """A user mode: even ranks together, odd ranks together."""

    name = "even_odd"

    def groups(self, layout):
        return [list(range(0, layout.world_size, 2)), list(range(1, layout.world_size, 2))]


class RankDependent(ProcessGroupInitializer):
    """A broken user mode whose groups depend on who computes them."""

    name = "rank_dependent"

    def groups(self, layout):
        if os.environ["RANK"] == "0":
            return [list(range(layout.world_size))]
        return [[r] for r in range(layout.world_size)]


def _plugin_modes(rank: int, world: int, yaml_text: str) -> dict:
    register_mode(EvenOdd)
    try:
        extra = yaml.safe_load(yaml_text)["modes"]
        ctx = ParallelContext.from_torch(tensor_parallel_size=2, modes=extra, timeout=60)
        out = {}
        for mode in ("even_odd", "data_pairs", "pipeline_embedding"):
            ranks = ctx.get_ranks_in_group(mode)
            value = torch.tensor([1.0])
            dist.all_reduce(value, group=ctx.get_group(mode))
            assert value.item() == len(ranks) == ctx.get_world_size(mode)
            out[mode] = ranks
            # the library's own collectives take the plug-in mode like a built-in one
            x = torch.tensor([float(rank)], requires_grad=True)
            y = lightning_parallelctx.distributed.reduce(x, mode=mode)
            assert y.item() == sum(ranks)
            y.backward()
            assert x.grad.item() == 1.0  # reduce's backward is the identity
            assert lightning_parallelctx.distributed.get_world_size(mode) == len(ranks)
        out["calls"] = ctx.new_group_calls
        # pickled with a module, it comes back as the live context that has these modes
        assert pickle.loads(pickle.dumps(ctx)) is ctx and copy.deepcopy(ctx) is ctx
        plain = ParallelContext.from_torch(tensor_parallel_size=2, timeout=60)  # same layout, fewer modes
        assert pickle.loads(pickle.dumps(ctx)) is ctx and pickle.loads(pickle.dumps(plain)) is plain
        plain.destroy()
        ctx.destroy()
        return out
    finally:
        unregister_mode("even_odd")


PLUGIN_YAML = """
modes:
  - class_path: lightning_parallelctx.initializers.BlockInitializer
    init_args: {name: data_pairs, parent: data, block_size: 2}
  - pipeline_embedding
"""


@pytest.mark.parametrize("world", [4, 8])
def test_plugin_modes_from_python_and_yaml(world):
    results = spawn(_plugin_modes, world, PLUGIN_YAML, timeout=120)
    for rank, r in enumerate(results):
        assert r["even_odd"] == list(range(rank % 2, world, 2))
        data = [x for x in range(world) if x % 2 == rank % 2]  # tp=2: data group = same tp rank
        pairs = [data[i:i + 2] for i in range(0, len(data), 2)]
        assert r["data_pairs"] == next(p for p in pairs if rank in p)
        assert r["pipeline_embedding"] == [rank]  # pp=1: first stage == last stage


def _rank_dependent(rank: int, world: int) -> None:
    ParallelContext.from_torch(modes=[RankDependent()], timeout=30)


def test_plugin_with_rank_dependent_groups_fails_everywhere_before_any_group():
    with pytest.raises(RankFailure) as err:
        spawn(_rank_dependent, 4, timeout=60)
    assert sorted(err.value.errors) == [0, 1, 2, 3]
    for text in err.value.errors.values():
        assert "mode 'rank_dependent' groups differ" in text, text


def test_plugin_registration_errors():
    class Overlap(ProcessGroupInitializer):
        name = "overlap"

        def groups(self, layout):
            return [[0, 1], [1, 2]]

    from lightning_parallelctx import RankLayout
    from lightning_parallelctx.initializers import compute_mode_groups

    with pytest.raises(ParallelConfigError, match="does not partition its ranks: rank 1"):
        compute_mode_groups(Overlap(), RankLayout.build(4))
    register_mode(EvenOdd)
    try:
        register_mode(EvenOdd)  # the same class again: a no-op

        class Other(EvenOdd):
            pass

        with pytest.raises(ParallelConfigError, match="already registered"):
            register_mode(Other)
        with pytest.raises(ParallelConfigError, match="built in"):
            register_mode(EvenOdd, name="tensor")
    finally:
        unregister_mode("even_odd")
