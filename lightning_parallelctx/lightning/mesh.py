"""``self.device_mesh`` for code written for Lightning's ``ModelParallelStrategy`` (docs/traps.md #28).

The mesh is the context's own :attr:`ParallelContext.device_mesh` (dims ``pp, dp, ep, sp, tp``,
outermost first, over the context's groups) plus flattened sub-meshes registered on it, so that
``mesh[name]`` answers to Lightning's names and to the library's composite modes:

====================  ==============================================  ====================
name                  ranks                                           use
====================  ==============================================  ====================
``"data_parallel"``   DATA x SEQUENCE x EXPERT (= ``dense_replica``)  ``fully_shard`` mesh
``"tensor_parallel"`` TENSOR                                          ``parallelize_module``
``"dense_replica"``,  the composite modes of the same name            FSDP2 / HSDP, custom
``"expert_replica"``,
``"data_shard"``
====================  ==============================================  ====================

"data_parallel" is the dense replica group rather than DATA alone because that is where FSDP2 must
shard and reduce dense parameters (their gradients are averaged over DATA x SEQUENCE x EXPERT);
with sequence and expert sizes 1 the two are the same ranks.

torch's ``DeviceMesh._flatten`` would create the flattened dims' process groups with ``new_group``
over the whole world (O(world) calls on every rank); here each flattened mesh is built with
``_init_backend=False`` and handed the context's existing group, as ``DeviceMesh.from_group``
does for the root mesh. Nothing here talks to other processes.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ..errors import ParallelCtxError
from ..mode import SHORT_NAMES

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from ..context import ParallelContext

__all__ = ["LIGHTNING_NAMES", "lightning_device_mesh"]

#: Flattened dim name -> the context mode whose group it is.
LIGHTNING_NAMES: dict[str, str] = {
    "data_parallel": "dense_replica",
    "tensor_parallel": "tensor",
    "dense_replica": "dense_replica",
    "expert_replica": "expert_replica",
    "data_shard": "data_shard",
}
_MODE_AXES = {"dense_replica": ("data", "expert", "sequence"), "expert_replica": ("data", "sequence"),
              "data_shard": ("data", "expert"), "tensor": ("tensor",)}

# torch 2.13 warns that slicing a flattened dim from the root mesh "will be deprecated", but
# Lightning's examples and torchtitan-style code index the root mesh by name
# (device_mesh["data_parallel"]); with ModelParallelStrategy those names are root dims and no
# warning appears. The message is specific, so nothing else is hidden.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh", category=UserWarning)


def lightning_device_mesh(ctx: ParallelContext) -> DeviceMesh:
    """The context's DeviceMesh with the flattened names above registered on it (idempotent)."""
    root = ctx.device_mesh
    try:
        _register_flat_dims(root, ctx)
    except (ImportError, AttributeError, TypeError) as err:
        # DeviceMesh internals moved (another torch version): the library's own dim names still
        # work; Lightning's names then raise torch's KeyError listing them.
        warnings.warn(f"self.device_mesh: could not add the names {sorted(LIGHTNING_NAMES)} on this torch version "
                      f"({type(err).__name__}: {err}); use the dims {root.mesh_dim_names}", stacklevel=2)
    return root


def _register_flat_dims(root: DeviceMesh, ctx: ParallelContext) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.device_mesh import _MeshLayout  # type: ignore[attr-defined]

    names = root.mesh_dim_names
    assert names is not None
    for flat_name, mode in LIGHTNING_NAMES.items():
        if flat_name in root._flatten_mapping:
            continue
        axes = [SHORT_NAMES[a] for a in _MODE_AXES[mode]]
        sub = root[tuple(n for n in names if n in axes)]  # root order: ascending, as torch requires
        flat = DeviceMesh(root.device_type, _layout=_MeshLayout([sub._layout.collapse()]), _rank_map=root._rank_map,
                          mesh_dim_names=(flat_name,), _root_mesh=root, _init_backend=False)
        group = ctx.get_group(mode)
        ranks = [int(r) for r in flat.mesh.flatten().tolist()]
        if ranks != ctx.get_ranks_in_group(mode):
            # The mesh coordinate and the group rank must agree, or DTensor shards land on the
            # wrong ranks silently. Cannot happen with the context's sorted groups; checked anyway.
            raise ParallelCtxError(
                f"mesh dim {flat_name!r}: DeviceMesh ranks {ranks} differ from the context's {mode!r} group "
                f"{ctx.get_ranks_in_group(mode)}"
            )
        flat._dim_group_names = [group.group_name]
        root._pg_registry[group.group_name] = group
        root._flatten_mapping[flat_name] = flat
