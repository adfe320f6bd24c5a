"""Which launcher started this process, and the torch.distributed environment it implies.

torch.distributed reads its rendezvous from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. ``torchrun`` (one node or many: ``--nnodes M --node-rank
i``) sets them itself. Under SLURM, ``srun vistrain fit ...`` starts one task per process and
describes it with ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NODELIST``:
:func:`adopt_slurm_env` translates those, so ``srun`` works without ``torchrun`` (as
Lightning's and detectron2's SLURM support does). The first host of the node list is the
rendezvous master; the port comes from ``MASTER_PORT`` when set, else from the job id, so two
jobs sharing a node do not collide.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

DEFAULT_PORT = 29500
"""Rendezvous port under SLURM when neither ``MASTER_PORT`` nor a job id is known."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"gpu[01-03,07],cpu5"`` -> gpu01, gpu02, gpu03, gpu07, cpu5.

    Zero padding of ranges is kept. Plain names pass through.

    Raises:
        ValueError: If a bracket is not closed or a range is not ``a-b`` of integers.
    """
    if nodelist.count("[") != nodelist.count("]"):
        raise ValueError(f"SLURM_NODELIST={nodelist!r}: unbalanced bracket")
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist.strip()):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not first.isdigit() or (last and not last.isdigit()):
                raise ValueError(f"SLURM_NODELIST={nodelist!r}: bad range {part!r}")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}")
    if not hosts:
        raise ValueError(f"SLURM_NODELIST={nodelist!r} names no host; check the job's node list")
    return hosts


def launched_by_slurm(env: MutableMapping[str, str] | None = None) -> bool:
    """True for a task of a multi-task SLURM step that no torchrun started."""
    env = os.environ if env is None else env
    return int(env.get("SLURM_NTASKS", "1")) > 1 and "WORLD_SIZE" not in env


def adopt_slurm_env(env: MutableMapping[str, str] | None = None) -> bool:
    """Fill torch.distributed's variables from SLURM's; a no-op outside a SLURM step.

    Args:
        env: The environment to read and update (default ``os.environ``).

    Returns:
        True when the variables were set from SLURM's.

    Raises:
        ValueError: If a SLURM variable is malformed (named in the message).
    """
    env = os.environ if env is None else env
    if not launched_by_slurm(env):
        return False
    values: dict[str, int] = {}
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        text = env.get(name, "")
        if not text.isdigit():
            raise ValueError(f"{name}={text!r} is not a non-negative integer; run under srun")
        values[name] = int(text)
    master = expand_nodelist(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "")))[0]
    job_id = env.get("SLURM_JOB_ID", "")
    port = DEFAULT_PORT + int(job_id) % 10000 if job_id.isdigit() else DEFAULT_PORT
    env["RANK"] = str(values["SLURM_PROCID"])
    env["WORLD_SIZE"] = str(values["SLURM_NTASKS"])
    env["LOCAL_RANK"] = str(values["SLURM_LOCALID"])
    env.setdefault("MASTER_ADDR", master)
    env.setdefault("MASTER_PORT", str(port))
    return True


def launch_run_id(env: MutableMapping[str, str] | None = None) -> str | None:
    """An id every rank of one launch shares (SLURM job id, torchrun run id), else None.

    Used to name a default run folder that all ranks agree on without talking to each other.
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = env.get(name, "")
        if value and value != "none":
            return re.sub(r"[^A-Za-z0-9_.-]", "_", value)
    return None


__all__ = ["adopt_slurm_env", "expand_nodelist", "launch_run_id", "launched_by_slurm"]
