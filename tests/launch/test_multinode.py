"""Past one machine: torchrun with two nodes, and srun under SLURM without torchrun.

Both start two real processes on this machine (one per "node"), rendezvous on the loopback
address, and must train exactly as a 2-process single-node run (``--devices 2``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import TINY_TOY_SETS, run_vistrain, start_vistrain, toy_args, vistrain_env
from trainer_fixtures import read_metrics
from vistrain.common.launch_env import adopt_slurm_env, expand_nodelist, launch_run_id

TOY = toy_args("num_epochs=1", *TINY_TOY_SETS, "batch_size=8")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")
    }
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _records(out: Path) -> list[tuple[str, int, float]]:
    rows = read_metrics(str(out))
    return [(r["tag"], r["step"], r["value"]) for r in rows if not r["tag"].startswith("perf/")]


def _wait_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (out or "")[-2000:] + (err or "")[-2000:]


@pytest.fixture(scope="module")
def single_node(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, float]]:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run_vistrain(
        "fit", *TOY, "--devices", "2", "--output-dir", str(out), env=_clean_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    assert any(tag.startswith("val/") for tag, _, _ in records)
    return records


def test_torchrun_two_nodes_equals_two_processes_on_one_node(single_node, tmp_path) -> None:
    out = tmp_path / "run"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "vistrain",
                "fit",
                *TOY,
                "--output-dir",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=vistrain_env(_clean_env()),
        )
        for node in (0, 1)
    ]
    _wait_all(procs)
    assert _records(out) == single_node


def test_srun_tasks_train_without_torchrun(single_node, tmp_path) -> None:
    out = tmp_path / "run"
    port = str(_free_port())
    procs = [
        start_vistrain(
            "fit",
            *TOY,
            "--output-dir",
            str(out),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_clean_env(
                SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank),
                SLURM_NTASKS="2",
                SLURM_NODELIST="localhost",
                SLURM_JOB_ID="4242",
                MASTER_PORT=port,
            ),
        )
        for rank in (0, 1)
    ]
    _wait_all(procs)
    assert _records(out) == single_node


def test_slurm_variables_map_onto_torch_distributed() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "gpu[07-08,10]",
        "SLURM_JOB_ID": "123456",
    }
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(29500 + 3456)
    assert launch_run_id(env) == "123456"
    # Under torchrun (WORLD_SIZE already set) or a single task nothing changes.
    assert not adopt_slurm_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert not adopt_slurm_env({**env, "WORLD_SIZE": "8"})
    assert expand_nodelist("a[9-11],b") == ["a9", "a10", "a11", "b"]
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        adopt_slurm_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "x", "SLURM_LOCALID": "0"})


def test_malformed_slurm_variables_are_a_one_line_error(tmp_path) -> None:
    proc = run_vistrain(
        "fit",
        *TOY,
        "--output-dir",
        str(tmp_path / "o"),
        timeout=120,
        env=_clean_env(
            SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODELIST="n[1-"
        ),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vistrain: error: SLURM_NODELIST='n[1-': unbalanced bracket"
    assert not (tmp_path / "o").exists()
