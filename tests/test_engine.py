"""The engine end to end: loss, gradients, conditioning, training, resume, sampling."""

from __future__ import annotations

import torch

from vsd.apps.training import Trainer, fixed_batch
from vsd.core.engine import ViewsetDiffusion
from vsd.core.viewset import collate_viewsets


def _model(recipe):
    ds = recipe.data.build(split="train")
    return ViewsetDiffusion(recipe, ds.info), ds


def test_loss_reaches_every_parameter(tiny_recipe):
    recipe = tiny_recipe(["diffusion.self_condition_prob=0.0", "train.cond_probs=[0.5, 0.5]"])
    model, ds = _model(recipe)
    batch = collate_viewsets([ds[0], ds[1]])
    loss, stats = model.training_loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches: {missing}"


def test_conditioning_views_pass_through_at_t0(tiny_recipe):
    recipe = tiny_recipe()
    model, ds = _model(recipe)
    model.eval()
    batch = collate_viewsets([ds[0], ds[1]]).select_views(slice(0, 3))
    seen = []
    real_encode = model.denoiser.encode_views

    def spy(images, cameras, timesteps, self_cond, *a, **k):
        seen.append((images.clone(), timesteps.clone()))
        return real_encode(images, cameras, timesteps, self_cond, *a, **k)

    model.denoiser.encode_views = spy
    cond = batch.images[:, :1]
    # the uncached path encodes every view at each step (the cache gives the same result: below)
    out = model.sample(batch.cameras, cond, steps=3, generator=torch.Generator().manual_seed(0), cache_conditioning=False)
    assert len(seen) == 3
    for images, ts in seen:
        assert torch.equal(images[:, :1], cond)  # clean view fed unchanged
        assert (ts[:, 0] == 0).all()  # and at t=0
    noisy_t = [int(ts[0, 1]) for _, ts in seen]
    assert noisy_t[0] > 0 and noisy_t == sorted(noisy_t, reverse=True) and len(set(noisy_t)) == 3
    assert all((ts[:, 1:] == ts[0, 1]).all() for _, ts in seen)  # one noise level per viewset
    assert out.x0.shape == batch.images.shape


def test_unconditional_sampling_has_no_clean_view(tiny_recipe):
    model, ds = _model(tiny_recipe())
    model.eval()
    batch = collate_viewsets([ds[0]]).select_views(slice(0, 3))
    seen = []
    real_encode = model.denoiser.encode_views
    model.denoiser.encode_views = lambda images, cameras, ts, sc, *a, **k: (seen.append(ts.clone()), real_encode(images, cameras, ts, sc, *a, **k))[1]
    out = model.sample(batch.cameras, None, steps=2, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2 and (seen[0] > 0).all() and all((ts == ts[0, 0]).all() for ts in seen)
    assert out.x0.min() >= -1 and out.x0.max() <= 1


def test_training_writes_outputs_and_resume_matches_uninterrupted(tiny_recipe, tmp_path):
    recipe4 = tiny_recipe(["train.steps=4"])
    full = Trainer(recipe4, tmp_path / "full", quiet=True)
    full.run()

    recipe2 = tiny_recipe(["train.steps=2"])
    Trainer(recipe2, tmp_path / "split", quiet=True).run()
    resumed = Trainer(recipe4, tmp_path / "split", resume=True, quiet=True)
    assert resumed.step == 2
    resumed.run()
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n
    out = tmp_path / "full"
    assert (out / "checkpoints" / "last.pt").is_file()
    assert (out / "recipe.yaml").is_file()
    assert list((out / "samples").glob("*_cond.png")) and list((out / "samples").glob("*_turntable.gif"))
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 5


def test_same_seed_same_run(tiny_recipe, tmp_path):
    a = Trainer(tiny_recipe(), tmp_path / "a", quiet=True)
    a.run()
    b = Trainer(tiny_recipe(), tmp_path / "b", quiet=True)
    b.run()
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), n


def test_deterministic_baseline_single_pass(tiny_recipe):
    model, ds = _model(tiny_recipe(["train.deterministic=true"]))
    batch = collate_viewsets([ds[0], ds[1]])
    loss, _ = model.training_loss(batch)
    assert torch.isfinite(loss)
    model.eval()
    calls = []
    real_predict = model.predict
    model.predict = lambda *a, **k: (calls.append(1), real_predict(*a, **k))[1]
    v3 = batch.select_views(slice(0, 3))
    model.sample(v3.cameras, v3.images[:, :1], steps=10)
    assert len(calls) == 1


def test_conditioning_feature_cache_gives_the_same_samples(tiny_recipe):
    model, ds = _model(tiny_recipe())
    model.eval()
    batch = collate_viewsets([ds[0], ds[1]]).select_views(slice(0, 3))
    calls = []
    real = model.denoiser.encode_views
    model.denoiser.encode_views = lambda images, *a, **k: (calls.append(images.shape[1]), real(images, *a, **k))[1]
    outs = []
    for cache in (True, False):
        calls.clear()
        out = model.sample(batch.cameras, batch.images[:, :1], steps=4, generator=torch.Generator().manual_seed(3), cache_conditioning=cache)
        outs.append((out.x0, list(calls)))
    (cached, calls_cached), (plain, calls_plain) = outs
    assert calls_cached == [1, 2, 2, 2, 2]  # the clean view is encoded once, the others per step
    assert calls_plain == [3, 3, 3, 3]
    assert torch.allclose(cached, plain, atol=1e-4)


def test_tensorboard_scalars_when_available(tiny_recipe, tmp_path, monkeypatch):
    import vsd.apps.training as training

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed", -1))

    monkeypatch.setattr(training, "summary_writer", lambda d: FakeWriter(d))
    Trainer(tiny_recipe(), tmp_path / "tb", quiet=True).run()
    assert ("train/loss", 1) in written and ("train/loss", 2) in written and written[-1][0] == "closed"


def test_init_from_copies_the_shared_network_and_leaves_a_new_head_fresh(tiny_recipe, tmp_path):
    import pytest

    from vsd.core.errors import VsdError
    from vsd.apps.sampling import load_model

    source = Trainer(tiny_recipe(), tmp_path / "voxel", quiet=True)
    source.run()
    theirs = load_model(tmp_path / "voxel", device="cpu").state_dict()  # EMA weights
    swap = ["representation.type=triplane", f"train.init_from={tmp_path / 'voxel'}"]
    t = Trainer(tiny_recipe(swap), tmp_path / "triplane", quiet=True)
    own = t.model.state_dict()
    denoiser = [k for k in own if k.startswith("denoiser.")]
    assert denoiser and all(torch.equal(own[k], theirs[k]) for k in denoiser)
    assert all(torch.equal(t.ema.model.state_dict()[k], theirs[k]) for k in denoiser)  # EMA starts there too
    assert not any(k in theirs for k in own if k.startswith("representation."))  # the new head starts fresh
    t.run()  # and trains
    with pytest.raises(VsdError, match=r"denoiser of .* does not match .* tensors differ: denoiser\..* vs "):
        Trainer(tiny_recipe(["model.base_channels=4", f"train.init_from={tmp_path / 'voxel'}"]), tmp_path / "other", quiet=True)


def test_view_weights_clean_views_at_their_own_t0_weight_heldout_at_its_weight(tiny_recipe):
    recipe = tiny_recipe(["diffusion.min_snr_gamma=5.0", "train.clean_weight=1.0", "train.heldout_weight=0.25", "data.views=4", "train.heldout_views=1"])
    model, _ = _model(recipe)
    t = torch.tensor([999, 10])
    clean = torch.tensor([[True, False, False], [False, False, False]])
    w = model.view_weights(t, clean)
    snr = model.schedule.min_snr_weight(t, 5.0) / 5.0
    assert w.shape == (2, 4)
    assert w[0, 0] == 1.0  # the clean view: not the tiny weight of its viewset's t = 999
    assert w[0, 1] == w[0, 2] == snr[0] and snr[0] < 1e-3
    assert w[1, :3].tolist() == [1.0, 1.0, 1.0] and snr[1] == 1.0  # low t: min(SNR, 5) / 5 = 1
    assert w[:, 3].tolist() == [0.25, 0.25]
    # null gamma: uniform weights on the input views
    import dataclasses

    model.recipe = dataclasses.replace(model.recipe, diffusion=model.recipe.diffusion.model_copy(update={"min_snr_gamma": None}))
    assert model.view_weights(t, clean)[:, :3].eq(1.0).all()


def test_learning_rate_warms_up_then_decays_to_its_floor():
    from vsd.core.recipe import TrainSettings
    from vsd.apps.training import learning_rate

    tr = TrainSettings(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(tr, 0) == 1e-4 and learning_rate(tr, 9) == 1e-3
    assert abs(learning_rate(tr, 60) - 0.55e-3) < 1e-12  # half way: (1 + 0.1) / 2
    assert abs(learning_rate(tr, 110) - 1e-4) < 1e-12 and abs(learning_rate(tr, 500) - 1e-4) < 1e-12
    const = tr.model_copy(update={"lr_schedule": "constant"})
    assert learning_rate(const, 100) == 1e-3


def test_pass_both_hands_the_stem_features_to_unprojection(tiny_recipe):
    recipe = tiny_recipe(["encoder.pass_both=true", "encoder.channels=8", "encoder.out_channels=12"])
    model, ds = _model(recipe)
    enc = model.denoiser.encoder
    assert enc.out_channels == 20 and model.denoiser.lift.weight.shape[1] == 20
    x, temb = torch.randn(2, 12, 16, 16), torch.randn(2, recipe.model.time_dim)
    out = enc(x, temb)
    assert out.shape == (2, 20, 8, 8) and torch.equal(out[:, :8], enc.stem(x))
    loss, _ = model.training_loss(collate_viewsets([ds[0], ds[1]]), seed=0)
    loss.backward()
    assert enc.stem.weight.grad.abs().sum() > 0


def test_colour_augment_rotates_hues_alike_in_every_view_and_keeps_greys(tiny_recipe):
    from vsd.core.engine import _Draws

    model, ds = _model(tiny_recipe())
    batch = collate_viewsets([ds[0], ds[1]])
    draw = lambda: _Draws(torch.Generator().manual_seed(2), 2, slice(0, 2), "cpu")  # noqa: E731
    out = model._rotate_hues(batch, draw(), 1.0).images
    src = batch.images
    grey = (src.amax(2) - src.amin(2)) < 1e-6  # (B, V, H, W): white background and any grey texel
    assert grey.any() and torch.allclose(out.movedim(2, -1)[grey], src.movedim(2, -1)[grey], atol=1e-5)
    coloured = (src.amax(2) - src.amin(2)) > 0.3  # saturated texels move visibly
    assert coloured.any() and (out - src).abs().movedim(2, -1)[coloured].amax() > 0.2
    # one rotation per viewset: a colour of view 0 planted in view 2 comes out alike in both
    import dataclasses

    b, v, y, x = [int(i) for i in coloured.nonzero()[0]]
    planted = src.clone()
    planted[b, (v + 2) % 3, :, 0, 0] = src[b, v, :, y, x]
    got = model._rotate_hues(dataclasses.replace(batch, images=planted), draw(), 1.0).images
    assert torch.allclose(got[b, (v + 2) % 3, :, 0, 0], got[b, v, :, y, x], atol=1e-6)
    assert not torch.allclose(got[b, v, :, y, x], src[b, v, :, y, x], atol=0.05)
    assert torch.equal(model._rotate_hues(batch, draw(), 0.0).images, src)


def test_mirror_augment_is_a_consistent_viewset_of_the_mirrored_object(tiny_recipe):
    """train.mirror_augment: images flipped left-right and cameras reflected through the plane
    normal to train.mirror_axis, so a world point seen at (u, v) is seen mirrored at (W - u, v);
    rotations stay proper; probability 0 changes nothing; the loss trains through it."""
    from vsd.core.engine import _Draws

    model, ds = _model(tiny_recipe(["train.mirror_augment=1.0", "train.mirror_axis=z"]))
    batch = collate_viewsets([ds[0], ds[1]])
    draw = lambda: _Draws(torch.Generator().manual_seed(3), 2, slice(0, 2), "cpu")  # noqa: E731
    out = model._mirror(batch, draw(), 1.0, 2)
    assert torch.equal(out.images, batch.images.flip(-1))
    assert torch.allclose(torch.linalg.det(out.cameras.c2w[..., :3, :3]), torch.ones(2, batch.images.shape[1]), atol=1e-5)
    points = torch.tensor([[0.1, -0.2, 0.15], [-0.3, 0.05, -0.1], [0.0, 0.25, 0.2]])
    uv, depth = batch.cameras.project(points.expand(*batch.cameras.shape, 3, 3))
    uv_m, depth_m = out.cameras.project((points * torch.tensor([1.0, 1.0, -1.0])).expand(*batch.cameras.shape, 3, 3))
    W = batch.cameras.width
    assert torch.allclose(uv_m[..., 0], W - uv[..., 0], atol=1e-4) and torch.allclose(uv_m[..., 1], uv[..., 1], atol=1e-4)
    assert torch.allclose(depth_m, depth, atol=1e-5)
    # mirroring twice gives the viewset back; probability 0 leaves it alone
    again = model._mirror(out, draw(), 1.0, 2)
    assert torch.allclose(again.cameras.c2w, batch.cameras.c2w, atol=1e-6) and torch.equal(again.images, batch.images)
    same = model._mirror(batch, draw(), 0.0, 2)
    assert torch.equal(same.images, batch.images) and torch.equal(same.cameras.c2w, batch.cameras.c2w)
    loss, _ = model.training_loss(batch, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_own_views_noise_the_models_estimate_from_a_noisier_step(tiny_recipe):
    """train.own_views_prob=1: the self-conditioning pass runs at t_hi >= t, and the loss pass's
    noisy views are that estimate noised to t (the clean views and the target stay the truth)."""
    recipe = tiny_recipe(["diffusion.self_condition_prob=1.0", "train.own_views_prob=1.0", "train.cond_probs=[0, 1]"])
    model, ds = _model(recipe)
    batch = collate_viewsets([ds[0], ds[1]])
    V = batch.images.shape[1] - recipe.train.heldout_views
    seen = []
    real_predict = model.predict

    def spy(images, cameras, timesteps, self_cond, *a, **k):
        out = real_predict(images, cameras, timesteps, self_cond, *a, **k)
        seen.append((images.clone(), timesteps.clone(), self_cond.clone(), out.x0.detach().clone()))
        return out

    model.predict = spy
    loss, _ = model.training_loss(batch, seed=3)
    loss.backward()
    (est_in, t_hi, _, estimate), (x_in, t, sc, _) = seen
    x0 = batch.images[:, :V]
    assert torch.equal(t[:, 0], torch.zeros(2, dtype=torch.long)) and torch.equal(t_hi[:, 0], t[:, 0])
    assert (t_hi[:, 1:] >= t[:, 1:]).all() and (t_hi[:, 1:] < model.T).all()
    assert torch.equal(x_in[:, :1], x0[:, :1]) and torch.equal(sc[:, :1], x0[:, :1])
    assert torch.allclose(sc[:, 1:], estimate[:, 1:])
    # x_t = sqrt(abar) est + sqrt(1 - abar) eps: the same noise applied to the truth gives another input
    abar = model.schedule.alphas_cumprod[t[:, 1]].view(2, 1, 1, 1, 1).float()
    eps = (x_in[:, 1:] - abar.sqrt() * estimate[:, 1:].clamp(-1, 1)) / (1 - abar).sqrt()
    from_truth = abar.sqrt() * x0[:, 1:] + (1 - abar).sqrt() * eps
    assert not torch.allclose(from_truth, x_in[:, 1:], atol=1e-3)
    assert eps.std() > 0.5  # a real noise draw, not zero
    # off (the default): the loss pass sees the truth noised, at the estimate's own t
    seen.clear()
    model2, _ = _model(tiny_recipe(["diffusion.self_condition_prob=1.0", "train.cond_probs=[0, 1]"]))
    model2.predict = lambda *a, **k: (seen.append(a[2].clone()), ViewsetDiffusion.predict(model2, *a, **k))[1]
    model2.training_loss(batch, seed=3)
    assert torch.equal(seen[0], seen[1])


def test_input_fit_brings_the_sample_closer_to_its_conditioning_view(tiny_recipe):
    """diffusion.input_fit_steps fits the predicted volume to the clean view's pixels: the
    sample's render at the conditioning camera moves towards the input, every view is rendered
    from the same fitted volume, and 0 steps leaves sampling as it was."""
    torch.manual_seed(0)
    plain, ds = _model(tiny_recipe())
    fitting, _ = _model(tiny_recipe(["diffusion.input_fit_steps=20", "diffusion.input_fit_lr=0.1"]))
    fitting.load_state_dict(plain.state_dict())
    batch = collate_viewsets([ds[0], ds[1]]).select_views(slice(0, 3))
    outs = {}
    for name, model in (("plain", plain), ("fitting", fitting)):
        model.eval()
        outs[name] = model.sample(batch.cameras, batch.images[:, :1], steps=3, generator=torch.Generator().manual_seed(1))
    err = {n: (o.x0[:, 0] - batch.images[:, 0]).pow(2).mean().item() for n, o in outs.items()}
    assert err["fitting"] < 0.7 * err["plain"], err
    fitted = outs["fitting"]
    again = fitting.render(fitted.scene, batch.cameras)["rgb"] * 2 - 1
    assert torch.allclose(fitted.x0, again, atol=1e-5)
    assert not torch.allclose(outs["plain"].x0[:, 1:], fitted.x0[:, 1:], atol=1e-3)
