"""How a train step meets the devices: one jitted program over a Mesh, or jax.pmap.

`MeshParallel` runs the step under `jax.jit` with named shardings over a mesh with axes
(data, fsdp, tensor); a single device is the 1x1x1 mesh. `PmapParallel` replicates the state
and averages gradients with `psum` over the device axis. Both take the same pure step, the
same per-process rows of the global batch, and give checkpoints with the same layout (one
global, unreplicated state), so a run can resume on another strategy or device count.

Several hosts (lmjax.train.distributed starts them): every process runs the same program on
its own devices and feeds only the rows of the global batch its devices hold (`process_block`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

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


# ---------------------------------------------------------------------------------------
# Layouts


class Parallel(Protocol):
    """What the train loop, eval and sample ask of a device layout.

    The *global* state is one unreplicated TrainState laid out by `state_shardings`: what a
    checkpoint holds, whatever the layout it came from. The *step's* state is what the
    compiled step takes and returns: the global state itself on a mesh, one stacked copy per
    device under pmap.
    """

    kind: str  # 'mesh' | 'pmap'
    n_devices: int  # devices the step runs on, over all processes
    batch_divisor: int  # every global batch is a multiple of this many rows
    process_block: tuple[int, int]  # (index, count): this process feeds block `index` of `count` of the rows
    replicated: Sharding  # where scalars and metrics live

    def describe(self) -> str:
        """One line for the run's first lines: layout, devices, processes."""

    def state_shardings(
        self, model: nn.Module, tx: optax.GradientTransformation, init_state: Callable, rng: jax.Array
    ) -> TrainState:
        """The sharding of every leaf of the global state."""

    def init_state(self, init_state: Callable, shardings: TrainState, rng: jax.Array) -> Any:
        """A new step's state from `init_state(rng)`, created in place (no full copy on one device)."""

    def restore(self, read: Callable[[Any], Any], abstract: Any, shardings: Any) -> Any:
        """The step's state (or params) from `read(target)`, which restores the global one onto
        `target`: ShapeDtypeStructs with the shardings of `abstract`'s leaves."""

    def to_global(self, state: Any) -> Any:
        """The step's state → the global state, for a checkpoint or for sampling on the host."""

    def compile_step(self, make_step: Callable, shardings: TrainState) -> Callable:
        """`make_step(axis_name=...)` compiled for this layout, state donated."""

    def compile_eval(self, make_eval: Callable, shardings: TrainState) -> Callable:
        """`make_eval(axis_name=...)` compiled for this layout: (params, batch) → replicated sums."""

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows of a global batch → device arrays the compiled step takes."""

    def fetch(self, tree: Any) -> Any:
        """Replicated device values (metrics) → numpy, on every process."""


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ConfigDict:
    """A `parallel` section for a mesh of these sizes (-1: the rest of the devices)."""
    return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def restore_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract`'s leaves carrying `shardings`: what a restore fills."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def mesh_shape(parallel_cfg, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one -1 takes the rest of the devices."""
    sizes = [parallel_cfg.data, parallel_cfg.fsdp, parallel_cfg.tensor]
    names = [f"parallel.{a}" for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError("only one of parallel.data, parallel.fsdp, parallel.tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        fixed = " x ".join(f"{n}={s}" for n, s in zip(names, sizes) if s != -1)
        if n_devices % known:
            raise UserError(
                f"{fixed} = {known} does not divide the {n_devices} devices; choose sizes whose product divides "
                f"{n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(
            f"the mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but there are {n_devices}; make the product of parallel.data, parallel.fsdp, parallel.tensor "
            f"equal {n_devices} or set one of them to -1"
        )
    return tuple(sizes)


def logical_to_sharding(logical: P, shape: tuple, mesh: Mesh) -> NamedSharding:
    """Map a PartitionSpec of logical names to mesh axes, leaving a dimension unsharded
    where the mesh axes do not divide it (e.g. a vocabulary of 257 over tensor=2).
    Vectors (biases, norm scales) stay replicated."""
    if len(shape) < 2:  # biases and norm scales: too small to be worth a collective
        return NamedSharding(mesh, P())
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


def _by_process(devices) -> list:
    """Devices ordered by (process, id): each process then holds one contiguous block of the
    batch rows, since the batch axes (data, fsdp) lead the mesh."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def _row_block(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """(index, count): this process's devices hold block `index` of `count` equal, contiguous
    blocks of the rows (processes that are replicas of each other share a block)."""
    spans = sorted(
        {
            (s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
            for s in sharding.addressable_devices_indices_map((global_rows,)).values()
        }
    )
    lo, hi = spans[0][0], spans[-1][1]
    size = hi - lo
    if sum(b - a for a, b in spans) != size or global_rows % size or lo % size:
        raise UserError(
            f"parallel.tensor={sharding.mesh.shape['tensor']} splits the {jax.local_device_count()} devices "
            "of a process unevenly; make parallel.tensor divide the devices per process, or be a multiple of it"
        )
    return lo // size, global_rows // size


class MeshParallel:
    """`jax.jit` over a (data, fsdp, tensor) mesh; the global batch is split over data x fsdp."""

    kind = "mesh"

    def __init__(self, parallel_cfg, devices=None):
        devices = _by_process(devices if devices is not None else jax.devices())
        self.shape = mesh_shape(parallel_cfg, len(devices))
        self.mesh = Mesh(np.asarray(devices).reshape(self.shape), MESH_AXES)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.batch_divisor = self.shape[0] * self.shape[1]
        self.n_devices = self.mesh.size
        self.process_block = _row_block(self.batch_sharding, self.batch_divisor)

    def describe(self) -> str:
        hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        return (
            f"mesh data={self.shape[0]} fsdp={self.shape[1]} tensor={self.shape[2]} over "
            f"{self.mesh.size} {self.mesh.devices.flat[0].platform} devices{hosts}"
        )

    def state_shardings(self, model: nn.Module, tx: optax.GradientTransformation, init_state: Callable, rng):
        """Shardings of every leaf of the TrainState, from the model's logical axis names."""
        boxed = jax.eval_shape(lambda r: model.init(r, np.zeros((1, 1), np.int32))["params"], rng)
        logical = nn.get_partition_spec(boxed)
        abstract = jax.eval_shape(init_state, rng)
        param_sh = jax.tree.map(
            lambda spec, a: logical_to_sharding(spec, a.shape, self.mesh),
            logical,
            abstract.params,
            is_leaf=lambda x: isinstance(x, P),
        )
        opt_sh = optax.tree_map_params(
            tx,
            lambda _, s: s,
            abstract.opt_state,
            param_sh,
            transform_non_params=lambda _: self.replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        rep = self.replicated
        return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, skipped=rep)

    def init_state(self, init_state: Callable, shardings: TrainState, rng) -> TrainState:
        # Created directly sharded: no full copy on one device first.
        return jax.jit(init_state, out_shardings=shardings)(rng)

    def compile_step(self, make_step: Callable, shardings: TrainState) -> Callable:
        step = make_step(axis_name=None)
        return jax.jit(
            step,
            in_shardings=(shardings, self.batch_sharding),
            out_shardings=(shardings, self.replicated),
            donate_argnums=0,
        )

    def compile_eval(self, make_eval: Callable, shardings: TrainState) -> Callable:
        return jax.jit(
            make_eval(axis_name=None),
            in_shardings=(shardings.params, self.batch_sharding),
            out_shardings=self.replicated,
        )

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows of the global batch → global arrays sharded over data x fsdp."""
        count = self.process_block[1]
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v, (v.shape[0] * count, *v.shape[1:]))
            for k, v in local_batch.items()
        }

    def restore(self, read: Callable[[Any], Any], abstract: Any, shardings: Any) -> Any:
        return read(restore_target(abstract, shardings))

    def to_global(self, state):
        """A mesh's state is the global state already (sharded, never replicated per device)."""
        return state

    def fetch(self, tree):
        """Replicated device values → numpy (works across processes: each reads its own copy)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class PmapParallel:
    """`jax.pmap` data parallelism, state replicated on every device (JAX keeps pmap in
    maintenance mode; it is here to compare against and for old habits)."""

    kind = "pmap"
    axis_name = "devices"

    def __init__(self):
        self.local_devices = jax.local_devices()
        n_processes = jax.process_count()
        self.batch_divisor = len(self.local_devices) * n_processes
        self.n_devices = self.batch_divisor  # devices the step runs on, over all processes
        self.process_block = (jax.process_index(), n_processes)
        # pmap's own device order: grouped by process, local devices in local order.
        everywhere = [d for p in range(n_processes) for d in jax.local_devices(process_index=p)]
        self.replicated = NamedSharding(Mesh(np.asarray(everywhere), (self.axis_name,)), P())
        self.stacked = NamedSharding(Mesh(np.asarray(self.local_devices), (self.axis_name,)), P(self.axis_name))

    def describe(self) -> str:
        hosts = f" x {jax.process_count()} processes" if jax.process_count() > 1 else ""
        return f"pmap over {len(self.local_devices)} {self.local_devices[0].platform} devices{hosts}"

    def state_shardings(self, model, tx, init_state, rng):
        """One copy replicated on every device: what checkpoints hold and restore into."""
        abstract = jax.eval_shape(init_state, rng)
        return jax.tree.map(lambda _: self.replicated, abstract)

    def init_state(self, init_state: Callable, shardings, rng) -> TrainState:
        return self._stack(jax.jit(init_state, out_shardings=shardings)(rng))

    def compile_step(self, make_step: Callable, shardings) -> Callable:
        return jax.pmap(make_step(axis_name=self.axis_name), axis_name=self.axis_name, donate_argnums=0)

    def compile_eval(self, make_eval: Callable, shardings) -> Callable:
        return jax.pmap(make_eval(axis_name=self.axis_name), axis_name=self.axis_name)

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows → [local devices, rows per device, ...] arrays, one slice each."""
        n = len(self.local_devices)
        return {
            k: jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), self.stacked) for k, v in local_batch.items()
        }

    def restore(self, read: Callable[[Any], Any], abstract: Any, shardings: Any) -> Any:
        return self._stack(read(restore_target(abstract, shardings)))

    def to_global(self, state):
        """Stacked per-device copies → one copy replicated on every device of every process
        (through the host: no per-shape compilations, and saving copies to host anyway)."""

        def one(x):
            host = np.asarray(x.addressable_data(0))[0]
            return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])

        return jax.tree.map(one, state)

    def _stack(self, state):
        """A replicated state → a [local devices, ...] stack (once per run, through the host)."""
        n = len(self.local_devices)

        def stack(x):
            host = np.asarray(x.addressable_data(0))
            return jax.make_array_from_callback((n, *host.shape), self.stacked, lambda index: host[None])

        return jax.tree.map(stack, state)

    def fetch(self, tree):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def build_parallel(parallel_cfg):
    """The strategy named by `parallel.strategy` ('auto': a mesh over all devices)."""
    strategy = parallel_cfg.strategy
    if strategy == "single":
        if jax.process_count() > 1:
            raise UserError(
                "parallel.strategy='single' runs on one device of one process; use 'mesh' for a multi-process run"
            )
        return MeshParallel(mesh_config(1), jax.devices()[:1])
    if strategy == "pmap":
        if parallel_cfg.fsdp != 1 or parallel_cfg.tensor != 1 or parallel_cfg.data not in (-1, jax.device_count()):
            raise UserError(
                "parallel.strategy='pmap' is data parallel over all devices; set parallel.fsdp=1, "
                "parallel.tensor=1 and parallel.data=-1, or use parallel.strategy='mesh'"
            )
        return PmapParallel()
    return MeshParallel(parallel_cfg)


def check_batch(global_batch: int, grad_accum: int, parallel) -> None:
    per_micro = global_batch // grad_accum
    if per_micro % parallel.batch_divisor:
        raise UserError(
            f"train.batch_size={global_batch} / train.grad_accum={grad_accum} = {per_micro} sequences per micro-batch "
            f"does not divide over {parallel.batch_divisor} data-parallel devices (parallel.data x parallel.fsdp); "
            f"use a multiple of {parallel.batch_divisor}"
        )
