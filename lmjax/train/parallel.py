"""How a train step meets the devices: one jitted program over a Mesh, or jax.pmap.

`MeshParallel` runs the step under `jax.jit` with named shardings over a mesh with axes
(data, fsdp, tensor); a single device is the 1x1x1 mesh. `PmapParallel` replicates the state
and averages gradients with `psum` over the device axis. Both take the same pure step, the
same per-process rows of the global batch, and give checkpoints with the same layout.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.errors import UserError
from lmjax.train.step import TrainState

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis (named by the model) → mesh axes. A new layout is a change of this table.
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "pos": (),
    "norm": (),
    "layers": (),
}


def mesh_shape(parallel_cfg, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one -1 takes the rest of the devices."""
    sizes = [parallel_cfg.data, parallel_cfg.fsdp, parallel_cfg.tensor]
    if sizes.count(-1) > 1:
        raise UserError("only one of parallel.data, parallel.fsdp, parallel.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    if -1 in sizes:
        if n_devices % known:
            raise UserError(f"the mesh fsdp x tensor = {known} does not divide the {n_devices} devices; set parallel.* so the product divides it")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(f"the mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, but there are {n_devices}; make the product equal the device count or set one size to -1")
    return tuple(sizes)


def logical_to_sharding(logical: P, shape: tuple, mesh: Mesh) -> NamedSharding:
    """Map a PartitionSpec of logical names to mesh axes, leaving a dimension unsharded
    where the mesh axes do not divide it (e.g. a vocabulary of 257 over tensor=2)."""
    spec = []
    used = set()
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes if len(axes) > 1 else axes[0])
        else:
            spec.append(None)
    return NamedSharding(mesh, P(*spec))


class MeshParallel:
    """`jax.jit` over a (data, fsdp, tensor) mesh; the global batch is split over data x fsdp."""

    kind = "mesh"

    def __init__(self, parallel_cfg, devices=None):
        devices = devices if devices is not None else jax.devices()
        self.shape = mesh_shape(parallel_cfg, len(devices))
        self.mesh = Mesh(np.asarray(devices).reshape(self.shape), MESH_AXES)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.batch_divisor = self.shape[0] * self.shape[1]

    def describe(self) -> str:
        return f"mesh data={self.shape[0]} fsdp={self.shape[1]} tensor={self.shape[2]} over {self.mesh.size} {self.mesh.devices.flat[0].platform} devices"

    def state_shardings(self, model: nn.Module, tx: optax.GradientTransformation, init_state: Callable, rng):
        """Shardings of every leaf of the TrainState, from the model's logical axis names."""
        boxed = jax.eval_shape(lambda r: model.init(r, np.zeros((1, 1), np.int32))["params"], rng)
        logical = nn.get_partition_spec(boxed)
        abstract = jax.eval_shape(init_state, rng)
        param_sh = jax.tree.map(lambda spec, a: logical_to_sharding(spec, a.shape, self.mesh),
                                logical, abstract.params, is_leaf=lambda x: isinstance(x, P))
        opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                       transform_non_params=lambda _: self.replicated,
                                       is_leaf=lambda x: isinstance(x, NamedSharding))
        rep = self.replicated
        return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, skipped=rep)

    def init_state(self, init_state: Callable, shardings: TrainState, rng) -> TrainState:
        # Created directly sharded: no full copy on one device first.
        return jax.jit(init_state, out_shardings=shardings)(rng)

    def compile_step(self, make_step: Callable, shardings: TrainState) -> Callable:
        step = make_step(axis_name=None)
        return jax.jit(step, in_shardings=(shardings, self.batch_sharding),
                       out_shardings=(shardings, self.replicated), donate_argnums=0)

    def compile_eval(self, make_eval: Callable, shardings: TrainState) -> Callable:
        return jax.jit(make_eval(axis_name=None), in_shardings=(shardings.params, self.batch_sharding),
                       out_shardings=self.replicated)

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows of the global batch → global arrays sharded over data x fsdp."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}

    def restore_target(self, abstract: TrainState, shardings: TrainState):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def to_global(self, state):
        return state

    def from_restored(self, state):
        return state

    def params_of(self, state: TrainState):
        return state.params

    def fetch(self, tree):
        return jax.device_get(tree)


class PmapParallel:
    """`jax.pmap` data parallelism over the local devices, state replicated."""

    kind = "pmap"
    axis_name = "devices"

    def __init__(self, devices=None):
        self.devices = devices if devices is not None else jax.local_devices()
        self.batch_divisor = len(self.devices) * jax.process_count()
        self.single = NamedSharding(Mesh(np.asarray(self.devices[:1]), ("d",)), P())
        # pmap's inputs: a leading axis of size len(devices), one slice per device.
        self.stacked = NamedSharding(Mesh(np.asarray(self.devices), (self.axis_name,)), P(self.axis_name))

    def describe(self) -> str:
        return f"pmap over {len(self.devices)} local {self.devices[0].platform} devices x {jax.process_count()} processes"

    def state_shardings(self, model, tx, init_state, rng):
        abstract = jax.eval_shape(init_state, rng)
        return jax.tree.map(lambda _: self.single, abstract)

    def init_state(self, init_state: Callable, shardings, rng) -> TrainState:
        return self.from_restored(jax.jit(init_state)(rng))

    def compile_step(self, make_step: Callable, shardings) -> Callable:
        return jax.pmap(make_step(axis_name=self.axis_name), axis_name=self.axis_name,
                        donate_argnums=0, devices=self.devices)

    def compile_eval(self, make_eval: Callable, shardings) -> Callable:
        return jax.pmap(make_eval(axis_name=self.axis_name), axis_name=self.axis_name, devices=self.devices)

    def put_batch(self, local_batch: dict) -> dict:
        n = len(self.devices)
        return {k: jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), self.stacked)
                for k, v in local_batch.items()}

    def restore_target(self, abstract, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def to_global(self, state):
        """The replicated state → one copy (what checkpoints hold)."""
        return jax.tree.map(lambda x: x[0], state)

    def from_restored(self, state):
        n = len(self.devices)
        return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (n, *x.shape)), self.stacked), state)

    def params_of(self, state: TrainState):
        return state.params

    def fetch(self, tree):
        return jax.device_get(jax.tree.map(lambda x: x[0], tree))


def build_parallel(parallel_cfg):
    """The strategy named by `parallel.strategy` ('auto': a mesh over all devices)."""
    strategy = parallel_cfg.strategy
    if strategy == "single":
        return MeshParallel(_single_cfg(), jax.devices()[:1])
    if strategy == "pmap":
        if parallel_cfg.fsdp != 1 or parallel_cfg.tensor != 1:
            raise UserError("parallel.strategy='pmap' is data parallel only; set parallel.fsdp=1 and parallel.tensor=1, or use parallel.strategy='mesh'")
        return PmapParallel()
    return MeshParallel(parallel_cfg)


def _single_cfg():
    from ml_collections import ConfigDict

    return ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})


def check_batch(global_batch: int, grad_accum: int, parallel) -> None:
    per_micro = global_batch // grad_accum
    if per_micro % parallel.batch_divisor:
        raise UserError(
            f"train.batch_size={global_batch} / train.grad_accum={grad_accum} = {per_micro} sequences per micro-batch "
            f"does not divide over {parallel.batch_divisor} data-parallel devices; use a multiple of {parallel.batch_divisor}")
