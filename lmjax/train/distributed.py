"""Several processes (hosts): `initialize_distributed` starts `jax.distributed` from the
config or the environment, before any other JAX call; it decides which devices a process sees."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax

from lmjax.errors import UserError


def _cluster_detected(environ: Mapping[str, str]) -> str:
    """Name of the multi-process launcher JAX can read its settings from, or ''."""

    def count(key):
        try:
            return int(environ.get(key, "1"))
        except ValueError:
            return 1

    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in environ for k in slurm) and count("SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "," in environ.get("TPU_PROCESS_ADDRESSES", ""):
        return "a Cloud TPU pod"
    return ""


def distributed_args(parallel_cfg, environ: Mapping[str, str] | None = None) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for one process.

    Settings come from parallel.coordinator / num_processes / process_id, else from the
    environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    Multi-process runs under SLURM (srun), Open MPI (mpirun) or on a Cloud TPU pod need none
    of them: JAX reads the launcher's environment (the arguments left out are detected), as
    it also tries when parallel.distributed=True is set without them.
    """
    environ = os.environ if environ is None else environ

    def env_int(key: str, default: int) -> int:
        text = environ.get(key, "")
        try:
            return int(text) if text else default
        except ValueError:
            raise UserError(f"environment variable {key}='{text}' must be an integer") from None

    coordinator = parallel_cfg.coordinator or environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = parallel_cfg.num_processes or env_int("JAX_NUM_PROCESSES", 0)
    process_id = parallel_cfg.process_id if parallel_cfg.process_id >= 0 else env_int("JAX_PROCESS_ID", -1)
    cluster = _cluster_detected(environ)
    wanted = parallel_cfg.distributed or coordinator or num_processes > 1 or process_id >= 0 or cluster
    if not wanted or (num_processes == 1 and not cluster):
        return None
    args = {}
    if coordinator:
        if ":" not in coordinator:
            raise UserError(f"parallel.coordinator='{coordinator}' needs the form host:port, e.g. 10.0.0.1:1234")
        args["coordinator_address"] = coordinator
    if num_processes:
        args["num_processes"] = num_processes
    if process_id >= 0:
        args["process_id"] = process_id
    if not cluster and not parallel_cfg.distributed and len(args) < 3:
        raise UserError(
            "a multi-process run needs parallel.coordinator (host:port of process 0), parallel.num_processes "
            "and parallel.process_id, or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
            "JAX_PROCESS_ID; under SLURM, Open MPI or on a TPU pod they are detected"
        )
    if num_processes and not 0 <= process_id < num_processes and "process_id" in args:
        raise UserError(
            f"parallel.process_id={process_id} must be in 0..{num_processes - 1} "
            f"(parallel.num_processes={num_processes})"
        )
    return args


def initialize_distributed(parallel_cfg, environ: Mapping[str, str] | None = None, log: Callable = print) -> bool:
    """Start `jax.distributed` when the config or the environment asks for several processes.

    Must run before any other JAX call (it fixes which devices this process sees). Returns
    whether this is a multi-process run. A coordinator that never answers ends the process
    after JAX's 5-minute timeout.
    """
    if jax.distributed.is_initialized():
        return True
    args = distributed_args(parallel_cfg, environ)
    if args is None:
        return False
    known = ", ".join(f"{k}={v}" for k, v in args.items()) or "settings detected from the launcher"
    log(f"joining a multi-process run ({known})")
    try:
        jax.distributed.initialize(**args)
    except ValueError as e:  # settings JAX could not complete from the environment
        raise UserError(
            f"cannot start the multi-process run ({e}); set parallel.coordinator, "
            "parallel.num_processes and parallel.process_id (or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        ) from None
    return True
