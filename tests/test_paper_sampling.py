"""The original's sampling loop (vsd.core.paper.sampling.sample_paper) against the original's
``ViewsetDiffusion.ddim_sample``.

``fixtures/paper_sampling_parity.safetensors`` was made by running the original's
``ViewsetDiffusion.ddim_sample(shape, cond, render_spinning_volume=True, classifier_free_guidance_w=w)``
(szymanowiczs/viewset-diffusion @ 5ec871b ``model/diffusion.py``, on the ``GaussianDiffusion`` of
denoising-diffusion-pytorch 1.5.3, the version its environment pins: cosine schedule, T = 1000,
x0 objective, eta 0) on CPU in float32, with the ``VoxelReconstructor`` and the random weights of
``fixtures/paper_model_parity.safetensors`` (pytorch3d replaced by the stand-ins described in
``test_paper_model.py``). Inputs: 2 viewsets of 3 SRN-style cameras (the first k clean, images
rounded to float16) plus 2 extra render cameras per viewset (the original's ``test_Rs`` /
``test_Ts``); the original's R, T and pose embeddings from ``SRNDataset``'s own code. Every random
draw came from torch's global generator after ``torch.manual_seed(seed)``; sample_paper is given a
``torch.Generator`` seeded alike. Cases (5 DDIM steps of T = 1000 each): k = 1 and k = 2 clean
views with guidance 0 (reconstruction), k = 1 with guidance -1 (the original's unconditional
generation, whose conditional pass still sees the dataset's clean view), k = 2 with guidance 0.5.
The fixture stores the original's outputs, ``(x0 + 1) / 2``; the script that made it is
``/tmp/orig/sampling_parity.py`` outside the project.
"""

from __future__ import annotations

import json

import pytest
import torch

from vsd.core.cameras import Cameras
from vsd.core.paper import OriginalCheckpointError, PaperDenoiser
from vsd.core.paper.sampling import PaperDiffusion, sample_paper

from paper_fixtures import original_state, read

WEIGHTS = "paper_model_parity.safetensors"
FIXTURE = "paper_sampling_parity.safetensors"


@pytest.fixture(scope="module")
def model():
    meta, tensors = read(WEIGHTS)
    state = original_state(meta, tensors)
    return PaperDenoiser.from_original_checkpoint(json.loads(meta["config"]), state).eval()


@pytest.fixture(scope="module")
def golden():
    meta, tensors = read(FIXTURE)
    return ({k: json.loads(v) for k, v in meta.items() if k in ("config", "cases", "views")}, tensors)


def _cameras(tensors, views):
    s = 16
    c2w, K = tensors["input/c2w"], tensors["input/K"]
    v = views["V"]
    return Cameras(c2w[:, :v], K[:, :v], s, s), Cameras(c2w[:, v:], K[:, v:], s, s)


CASES = sorted(json.loads(read(FIXTURE)[0]["cases"]))


@pytest.mark.parametrize("case", CASES)
def test_sampling_matches_the_original(model, golden, case):
    meta, tensors = golden
    k, w, seed, steps = meta["cases"][case]
    cams, extra = _cameras(tensors, meta["views"])
    clean = tensors["input/clean"].float()[:, :k]
    diffusion = PaperDiffusion.from_original(meta["config"])
    out = sample_paper(model, clean, cams, steps, w, torch.Generator().manual_seed(seed),
                       diffusion=diffusion, render_cameras=extra)
    expected = tensors["output/" + case]
    got = (out.renders + 1) * 0.5
    if w == -1.0:  # the original renders no clean view when unconditional
        got = got[:, k:]
    assert got.shape == expected.shape
    # float32 tolerance (measured against the original: 2.5e-6 at most)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    assert len(out.timesteps) == steps and out.timesteps[-1][1] == -1
    n = model.config.network.render_volume_size
    assert out.density.shape == (2, 1, n, n, n) and out.color.shape == (2, 3, n, n, n)
    # the check means something: another seed gives other samples
    other = sample_paper(model, clean, cams, steps, w, torch.Generator().manual_seed(seed + 1),
                         diffusion=diffusion, render_cameras=extra)
    assert (other.renders - out.renders).abs().max() > 1e-2


def test_unconditional_without_clean_views_runs(model, golden):
    meta, tensors = golden
    cams, _ = _cameras(tensors, meta["views"])
    model.train()
    out = sample_paper(model, None, cams, 2, -1.0, torch.Generator().manual_seed(0),
                       diffusion=PaperDiffusion(sampling_steps=2))
    assert model.training  # the denoiser's mode is restored
    model.eval()
    assert out.renders.shape == (2, 3, 3, 16, 16)
    assert torch.isfinite(out.renders).all() and out.renders.abs().max() <= 1.0
    empty = torch.zeros(2, 0, 3, 16, 16)
    again = sample_paper(model, empty, cams, 2, -1.0, torch.Generator().manual_seed(0),
                         diffusion=PaperDiffusion(sampling_steps=2))
    torch.testing.assert_close(again.renders, out.renders, rtol=0, atol=0)


def test_bad_arguments_are_refused(model, golden):
    meta, tensors = golden
    cams, _ = _cameras(tensors, meta["views"])
    clean = tensors["input/clean"].float()
    three = torch.cat([clean, clean[:, :1]], 1)
    with pytest.raises(ValueError, match="no view to sample"):
        sample_paper(model, three, cams, 2)
    with pytest.raises(ValueError, match="images_clean"):
        sample_paper(model, clean[:, :, :, :8], cams, 2)
    with pytest.raises(ValueError, match="steps"):
        sample_paper(model, clean[:, :1], cams, 0)


def test_the_released_schedule():
    released = {"model": {"diffuser": {"steps": 1000, "beta_schedule": "cosine"}}, "eval": {"sampling_timesteps": 250}}
    d = PaperDiffusion.from_original(released)
    assert (d.timesteps, d.beta_schedule, d.sampling_steps, d.eta) == (1000, "cosine", 250, 0.0)
    pairs = d.time_pairs()
    assert len(pairs) == 250 and pairs[0] == (999, 995) and pairs[-2] == (7, 3) and pairs[-1] == (3, -1)
    abar = d.alphas_cumprod64()
    assert abar.dtype == torch.float64 and abar.shape == (1000,) and 0 < abar[-1] < abar[0] < 1
    bad = {"model": {"diffuser": {"steps": 1000, "beta_schedule": "sigmoid"}}}
    with pytest.raises(OriginalCheckpointError, match=r"model\.diffuser\.beta_schedule"):
        PaperDiffusion.from_original(bad)
    with pytest.raises(OriginalCheckpointError, match=r"model\.diffuser\.steps"):
        PaperDiffusion.from_original({"model": {}})
