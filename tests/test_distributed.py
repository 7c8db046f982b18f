"""A 2-process torchrun run on the CPU (gloo) matches a single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from xai_sparsity.runs.rundir import RunDir
from xai_sparsity.training.trainer import TrainConfig, train

SETTINGS = {
    "train_size": 48,
    "test_size": 45,
    "probe_size": 20,
    "widths": [4, 4],
    "hidden": 8,
    "batch_size": 16,
    "epochs": 2,
    "lr": 0.05,
    "array_every": 2,
    "spatial_images": 2,
}

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from xai_sparsity.training.trainer import TrainConfig, train
train(TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    import json

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ddp_out = tmp_path / "ddp"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", str(script), json.dumps(SETTINGS), str(ddp_out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(TrainConfig.from_dict(SETTINGS), tmp_path / "single", progress=False)
    ddp = RunDir(ddp_out)
    a, b = single.history(), ddp.history()
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-4, atol=1e-5)
    assert ddp.summary["world_size"] == 2 and single.summary["world_size"] == 1
    # rank 0 alone wrote the files: one history, no stray temporary files
    assert sorted(p.name for p in ddp.path.iterdir() if p.name.startswith(".")) == []
    arrays_a, arrays_b = single.load_arrays(2), ddp.load_arrays(2)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        np.testing.assert_allclose(arrays_a[key], arrays_b[key], rtol=1e-3, atol=1e-4)
