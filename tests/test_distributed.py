"""Multi-process training with torchrun (gloo on CPU), and precision / accumulation settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vsd.apps.training import Trainer
from vsd.core.checkpoint import run_checkpoints

HERE = Path(__file__).parent


def _torchrun(nproc: int, out: Path, *overrides: str) -> None:
    torchrun = shutil.which("torchrun") or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(HERE / "ddp_worker.py"), str(out), *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    rows = (run / "log.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    two, one = base / "two", base / "one"
    _torchrun(2, two, "train.steps=3", "train.batch_size=1")
    _torchrun(1, one, "train.steps=3", "train.batch_size=2")
    return two, one


def test_two_processes_stay_in_sync_and_see_different_data(ddp_runs):
    two, _ = ddp_runs
    r0, r1 = (json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["params"] == r1["params"] and r0["param_sum"] == r1["param_sum"]
    assert len(r0["seen"]) == 3 and r0["seen"] != r1["seen"]
    # only rank 0 writes: one checkpoint set, one log
    assert [p.name for p in run_checkpoints(two)] == ["step_00000001.pt", "step_00000002.pt", "step_00000003.pt"]
    assert len(_losses(two)) == 3


def test_two_processes_of_batch_b_match_one_of_batch_2b(ddp_runs):
    two, one = ddp_runs
    r0 = json.loads((two / "rank0.json").read_text())
    single = json.loads((one / "rank0.json").read_text())
    # the global batch is the same viewsets, split between the ranks
    r1 = json.loads((two / "rank1.json").read_text())
    assert [a + b for a, b in zip(r0["seen"], r1["seen"])] == single["seen"]
    # float32 kernels differ with the batch size, so equal up to rounding, not bit for bit
    assert _losses(two) == pytest.approx(_losses(one), rel=2e-3)
    # Adam's first moment is the running mean of the (all-reduced) gradients
    g2, g1 = torch.tensor(r0["grad_avg"]), torch.tensor(single["grad_avg"])
    assert (g2 - g1).norm() <= 5e-2 * g1.norm()


def test_resume_under_ddp_continues_the_same_run(ddp_runs, tmp_path):
    two, _ = ddp_runs
    split = tmp_path / "split"
    _torchrun(2, split, "train.steps=2", "train.batch_size=1")
    _torchrun(2, split, "train.steps=3", "train.batch_size=1", "--resume")
    for r in (0, 1):
        resumed = json.loads((split / f"rank{r}.json").read_text())
        whole = json.loads((two / f"rank{r}.json").read_text())
        assert resumed["seen"] == whole["seen"][2:]  # the resumed processes drew step 3's data
        assert resumed["params"] == pytest.approx(whole["params"], abs=1e-6)
    assert _losses(split) == pytest.approx(_losses(two), rel=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tiny_recipe, tmp_path):
    a = Trainer(tiny_recipe(["train.steps=2", "train.batch_size=2"]), tmp_path / "a", quiet=True)
    a.run()
    b = Trainer(tiny_recipe(["train.steps=2", "train.batch_size=2", "train.grad_accum=2"]), tmp_path / "b", quiet=True)
    b.run()
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=2e-3)
    # Adam's first moment holds the gradients: accumulated micro-batches give the full batch's
    ga = torch.cat([a.opt.state[p]["exp_avg"].flatten() for p in a.model.parameters()])
    gb = torch.cat([b.opt.state[p]["exp_avg"].flatten() for p in b.model.parameters()])
    assert (ga - gb).norm() <= 1e-2 * ga.norm()


def test_bf16_autocast_trains_on_cpu(tiny_recipe, tmp_path):
    t = Trainer(tiny_recipe(["train.steps=3", "train.precision=bf16"]), tmp_path / "bf16", quiet=True)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.run()
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses)  # finite, positive
    assert any(not torch.equal(b, p) for b, p in zip(before, t.model.parameters()))
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # master weights stay fp32


def test_compile_setting_trains(tiny_recipe, tmp_path):
    # the eager backend exercises the plumbing without a C++ build in the test suite
    import torch._dynamo

    torch._dynamo.reset()
    t = Trainer(tiny_recipe(["train.steps=1", "train.compile=true", "train.compile_backend=eager"]), tmp_path / "c", quiet=True)
    # the halves the loss calls are the compiled ones (compiling an unused method trains eagerly)
    assert "encode_views" in t.model.denoiser.__dict__ and "decode" in t.model.denoiser.__dict__
    t.run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert list(t.model.state_dict())[0].startswith("denoiser.")  # names unchanged by compiling


def test_device_setting_errors_are_clear(tiny_recipe, tmp_path):
    from vsd.core.errors import VsdError

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(VsdError, match="CUDA is not available"):
        Trainer(tiny_recipe(["device=cuda:0"]), tmp_path / "d", quiet=True)
