"""Paper recipes (a ``paper`` section instead of the plugin slots) and the model they build:
validation naming keys, the vsd model's pass equal to the parity-checked PaperDenoiser's, its
sampling equal to the original's loop, training with gradients into the released network."""

from __future__ import annotations

import json

import pytest
import torch

from vsd.cli.main import main
from vsd.core.cameras import Cameras
from vsd.core.contracts import SceneInfo
from vsd.core.models import build_model
from vsd.core.errors import RecipeError
from vsd.core.paper import PaperDenoiser
from vsd.core.paper.engine import PaperScene, PaperViewsetDiffusion
from vsd.core.paper.sampling import sample_paper
from vsd.core.recipe import load_recipe
from vsd.core.viewset import Viewset

from conftest import PAPER_TINY
from paper_fixtures import original_state, read

SRN_INFO = SceneInfo(0.5, 1.3, 51.98948897809546, 0.8, 1.8, "z", "white")


def _recipe(extra=(), ref="paper_srn_cars.yaml"):
    return load_recipe(ref, PAPER_TINY + ["data.root=unused"] + list(extra))


@pytest.fixture(scope="module")
def fixture_model():
    """The vsd model of the golden fixture's config, holding its weights (the original's modules' random weights)."""
    meta, tensors = read("paper_model_parity.safetensors")
    config = json.loads(meta["config"])
    denoiser = PaperDenoiser.from_original_checkpoint(config, original_state(meta, tensors)).eval()
    paper = {**config, "model": {**config["model"], "diffuser": {"steps": 1000, "beta_schedule": "cosine"}}}
    recipe = load_recipe("paper_srn_cars.yaml", ["data.root=unused", "data.image_size=16"] + [
        f"paper={json.dumps(paper)}"])
    model = build_model(recipe, SRN_INFO).eval()
    model.denoiser.load_state_dict(denoiser.state_dict())
    return model, denoiser, tensors


def _cameras(tensors, v=3):
    return Cameras(tensors["input/c2w"][:, :v], tensors["input/K"][:, :v], 16, 16)


@pytest.mark.parametrize("ref", ["paper_srn_cars.yaml", "paper_minens.yaml", "paper_co3d_hydrant.yaml"])
def test_shipped_paper_recipes_describe_the_released_network(ref):
    recipe = load_recipe(ref)
    assert recipe.is_paper and recipe.encoder is None and recipe.model is None
    unet = recipe.paper["model"]["unet"]
    assert unet["channel_mult"] == [1, 2, 4, 8] and unet["attn_resolutions"] == [16, 8, 4]
    assert unet["attention_aggregation"] is True and recipe.paper["model"]["feature_extractor_2d"]["pass_features"] == "both"
    assert recipe.diffusion.sampling_steps == 250 and recipe.diffusion.input_fit_steps == 0


def test_full_size_network_has_the_released_parameter_count():
    recipe = load_recipe("paper_srn_cars.yaml")
    with torch.device("meta"):
        model = build_model(recipe, SRN_INFO)
    n = sum(p.numel() for p in model.parameters())
    assert isinstance(model, PaperViewsetDiffusion)
    assert abs(n / 1e6 - 102.6) < 0.1, n


@pytest.mark.parametrize("override, key", [
    ("paper.model.unet.attention_aggregation=false", "paper.model.unet.attention_aggregation"),
    ("paper.model.unet.volume_repr=triplane", "paper.model.unet.volume_repr"),
    ("paper.render.post_activation=false", "paper.render.post_activation"),
    ("paper.data.dataset_type=shapenet", "paper.data.dataset_type"),
    ("paper.model.diffuser.beta_schedule=sigmoid", "paper.model.diffuser.beta_schedule"),
    ("encoder.type=conv", "encoder"),
    ("model.volume_size=8", "model"),
    ("diffusion.input_fit_steps=2", "diffusion.input_fit_steps"),
    ("diffusion.timesteps=500", "diffusion.timesteps"),
    ("data.image_size=32", "data.image_size"),
    ("data.fov_deg=40", "data.fov_deg"),
])
def test_unsupported_paper_settings_are_refused_by_key(override, key):
    with pytest.raises(RecipeError) as err:
        _recipe([override])
    assert err.value.key == key, (err.value.key, str(err.value))
    assert key.split(".")[-1] in str(err.value)


def test_cli_refuses_an_unsupported_paper_key_with_exit_2(capsys, tmp_path):
    code = main(["recipe", "paper_srn_cars.yaml", *PAPER_TINY, "data.root=unused", "paper.model.unet.attention_aggregation=false",
                 "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "paper.model.unet.attention_aggregation" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_predict_is_the_parity_checked_denoiser_pass(fixture_model):
    model, denoiser, tensors = fixture_model
    cams = _cameras(tensors)
    images = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([[0, 500, 500], [0, 20, 20]])
    torch.manual_seed(3)
    got = model.predict(images, cams, t, images).x0
    torch.manual_seed(3)
    want = denoiser(images, cams, t, images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.shape == (2, 3, 3, 16, 16) and got.std() > 1e-3


def test_sample_is_the_originals_loop(fixture_model):
    model, denoiser, tensors = fixture_model
    cams = _cameras(tensors)
    clean = torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pred = model.sample(cams, clean, steps=3, guidance=0.0, generator=torch.Generator().manual_seed(5))
    ref = sample_paper(denoiser, clean, cams, 3, 0.0, torch.Generator().manual_seed(5),
                       diffusion=model.paper_diffusion.__class__(1000, "cosine", 3), original_render_order=False)
    torch.testing.assert_close(pred.x0, ref.renders, rtol=0, atol=0)
    assert isinstance(pred.scene, PaperScene) and pred.scene.batch_size == 2
    # the scene renders back at the viewset's cameras close to the sample's own renders
    again = model.render(pred.scene, cams)["rgb"] * 2 - 1
    assert (again - pred.x0).abs().mean() < 0.05
    with pytest.raises(ValueError, match="input"):
        model.sample(cams, clean, steps=2, fit_steps=2)


def test_scene_field_matches_the_volumes(fixture_model):
    model, _, tensors = fixture_model
    g = torch.Generator().manual_seed(1)
    density, color = torch.randn(2, 1, 8, 8, 8, generator=g) * 3, torch.randn(2, 3, 8, 8, 8, generator=g)
    scene = model.scene(density, color)
    assert scene.bound == pytest.approx(0.5 * 7 / 8)  # the half-size of the outermost voxel centres along y
    # a voxel centre of the rendered grid: its raw values, activated
    half = model.paper_config.volume.half_size(8)
    idx = (2, 5, 3)  # [d, h, w] = (z, y, x)
    local = torch.tensor([idx[2], idx[1], idx[0]], dtype=torch.float) / 7 * 2 - 1
    sigma, rgb = scene.query((local * half)[None, None].expand(2, 1, 3).contiguous())
    gain = model.paper_config.render.gain
    want_sigma = torch.nn.functional.softplus(density[:, 0, idx[0], idx[1], idx[2]] * gain - 6)
    torch.testing.assert_close(sigma[:, 0], want_sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rgb[:, 0], (torch.sigmoid(color[:, :, idx[0], idx[1], idx[2]]) * 1.002 - 0.001).clamp(0, 1), rtol=1e-5, atol=1e-6)
    outside = scene.query(torch.tensor([[[0.0, 0.0, 0.45]]]).expand(2, 1, 3).contiguous())[0]
    assert (outside == 0).all()  # beyond the box's z half-size (0.3 * 7 / 8)
    assert scene[1].density.shape == (1, 1, 8, 8, 8) and torch.equal(scene[1].color, color[1:])


def test_training_loss_reaches_every_part_of_the_network(fixture_model):
    model, _, tensors = fixture_model
    model = build_model(model.recipe, SRN_INFO).train()
    g = torch.Generator().manual_seed(2)
    order = [0, 1, 2, 1]  # the fixture has 3 cameras per viewset; the 4th view is held out
    c2w, K = tensors["input/c2w"][:, order], tensors["input/K"][:, order]
    batch = Viewset(images=torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1, cameras=Cameras(c2w, K, 16, 16))
    loss, stats = model.training_loss(batch, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and "mse_heldout" in stats
    grads = {n: p.grad for n, p in model.named_parameters()}
    dead = [n for n, gr in grads.items() if gr is None or gr.abs().sum() == 0]
    # attention over views needs more than one view (the whole batch has them), so every part learns
    assert not dead, dead[:5]


# ---- importing a released-style original experiment --------------------------------------------
@pytest.fixture
def original_experiment(tmp_path, monkeypatch):
    """A tiny experiment saved as the original's train.py saves one (the golden fixture's config
    and the original modules' random weights), and an empty models folder."""
    from paper_fixtures import write_original_experiment

    monkeypatch.setenv("VSD_MODELS_DIR", str(tmp_path / "models"))
    config = json.loads(read("paper_sampling_parity.safetensors")[0]["config"])
    meta, tensors = read("paper_model_parity.safetensors")
    return write_original_experiment(tmp_path / "experiment", config, original_state(meta, tensors))


def test_import_then_sample_matches_the_original_code(original_experiment, tmp_path, capsys):
    from vsd.apps.sampling import load_model

    assert main(["import", str(original_experiment), "tiny-cars"]) == 0
    written = tmp_path / "models" / "tiny-cars" / "model.safetensors"
    assert written.is_file() and "tiny-cars" in capsys.readouterr().out
    assert main(["models"]) == 0 and "tiny-cars  (imported, step 1234" in capsys.readouterr().out
    # a second import under the same name keeps the first unless told to replace it
    before = written.read_bytes()
    assert main(["import", str(original_experiment), "tiny-cars"]) == 2
    assert "already exists" in capsys.readouterr().err and written.read_bytes() == before
    assert main(["import", str(original_experiment), "tiny-cars", "--overwrite"]) == 0
    capsys.readouterr()
    model = load_model("tiny-cars", device="cpu")
    assert isinstance(model, PaperViewsetDiffusion) and model.recipe.diffusion.sampling_steps == 5
    # the original's ddim_sample outputs for these weights (tests/test_paper_sampling.py)
    meta, golden = read("paper_sampling_parity.safetensors")
    views = json.loads(meta["views"])
    c2w, K = golden["input/c2w"], golden["input/K"]
    cams = Cameras(c2w[:, : views["V"]], K[:, : views["V"]], 16, 16)
    extra = Cameras(c2w[:, views["V"]:], K[:, views["V"]:], 16, 16)
    for case in ("recon_k1_w0", "guided_k2_w05"):
        k, w, seed, steps = json.loads(meta["cases"])[case]
        out = sample_paper(model.denoiser, golden["input/clean"].float()[:, :k], cams, steps, w,
                           torch.Generator().manual_seed(seed), diffusion=model.paper_diffusion, render_cameras=extra)
        torch.testing.assert_close((out.renders + 1) / 2, golden["output/" + case], rtol=1e-5, atol=2e-5)
    # the folder itself loads too (converted in memory), to the same weights
    direct = load_model(original_experiment, device="cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), n


def test_import_refuses_an_unsupported_original_config_with_exit_2(original_experiment, tmp_path, capsys):
    import yaml

    path = original_experiment / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"]["unet"]["attention_aggregation"] = False
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["import", str(original_experiment), "bad"]) == 2
    err = capsys.readouterr().err
    assert "model.unet.attention_aggregation" in err and "config.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "models" / "bad").exists()


def test_import_refuses_weights_of_another_network(original_experiment, tmp_path, capsys):
    import yaml

    path = original_experiment / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"]["unet"]["model_channels"] = 16  # the weights hold 8
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["import", str(original_experiment), "bad"]) == 2
    err = capsys.readouterr().err
    assert "model.pth" in err and "shape" in err and not (tmp_path / "models" / "bad").exists()


def test_an_unknown_model_name_lists_shipped_and_imported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSD_MODELS_DIR", str(tmp_path / "models"))
    assert main(["sample", "no-such-model", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "minens-voxel" in err and "imported with vsd-run import: none" in err
