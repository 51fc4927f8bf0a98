"""Noise schedules, DDIM/DDPM samplers, guidance and the diffusion settings."""

import math

import pytest
import torch
from pydantic import ValidationError

from vsd.core.schedule import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionSettings,
    NoiseSchedule,
    guided_x0,
    make_schedule,
    make_scheduler,
)

T = 1000


def cosine_abar(t: int, s: float = 0.008) -> float:
    """abar_t with t = 0 the first noising step: f((t + 1) / T) / f(0)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f((t + 1) / T) / f(0.0)


def linear_abar(t: int) -> float:
    return math.prod(1.0 - (1e-4 + i * (2e-2 - 1e-4) / (T - 1)) for i in range(t + 1))


@pytest.fixture(scope="module")
def cosine():
    return NoiseSchedule("cosine")


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule("linear")


def images(seed: int, shape=(2, 3, 3, 4, 4), low=-1.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g)


# ---------------------------------------------------------------- schedule


def test_cosine_alphas_cumprod_matches_closed_form(cosine):
    # Only the very last beta reaches the 0.999 clip, so every earlier step is the closed form.
    expected = torch.tensor([cosine_abar(t) for t in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(cosine.alphas_cumprod[:-1].double(), expected, rtol=1e-5, atol=0)
    assert cosine.betas[-1].item() == pytest.approx(0.999)
    assert cosine.betas[:-1].max() < 0.999
    assert cosine.alphas_cumprod.dtype == torch.float32 and cosine.alphas_cumprod.shape == (T,)


def test_linear_alphas_cumprod_is_cumprod_of_linspace_betas(linear):
    betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    torch.testing.assert_close(linear.betas.double(), betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        linear.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0
    )
    assert linear.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    assert linear.alphas_cumprod[499].item() == pytest.approx(linear_abar(499), rel=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alphas_cumprod_decreasing_in_open_unit_interval(kind):
    abar = NoiseSchedule(kind).alphas_cumprod
    assert (abar[1:] < abar[:-1]).all()
    assert (abar > 0).all() and (abar < 1).all()


def test_unknown_kind_and_bad_length_are_named():
    with pytest.raises(ValueError, match="'sigmoid'"):
        NoiseSchedule("sigmoid")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule(num_train_timesteps=0)


def test_add_noise_without_noise_scales_x0(cosine):
    x0 = images(0)
    out = cosine.add_noise(x0, torch.zeros_like(x0), 300)
    torch.testing.assert_close(out, math.sqrt(cosine_abar(300)) * x0, rtol=1e-5, atol=1e-6)


def test_add_noise_empirical_mean_and_variance(cosine):
    n, t = 200_000, 300
    x0 = torch.full((n,), 0.7)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(1))
    x_t = cosine.add_noise(x0, noise, t)
    abar = cosine_abar(t)
    assert x_t.mean().item() == pytest.approx(0.7 * math.sqrt(abar), abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_add_noise_per_view_timesteps(cosine):
    t = torch.tensor([[0, 500, 999], [10, 10, 900]])  # (B, V)
    x0 = torch.ones(2, 3, 3, 4, 4)
    signal = cosine.add_noise(x0, torch.zeros_like(x0), t)
    noise_only = cosine.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t)
    for b in range(2):
        for v in range(3):
            abar = cosine.alphas_cumprod[t[b, v]].item()
            assert torch.allclose(signal[b, v], torch.full((3, 4, 4), math.sqrt(abar)))
            assert torch.allclose(noise_only[b, v], torch.full((3, 4, 4), math.sqrt(1 - abar)))
    assert signal[0, 0, 0, 0, 0] > 0.99 and signal[0, 2, 0, 0, 0] < 1e-3
    assert torch.equal(signal[1, 0], signal[1, 1])


def test_add_noise_per_batch_timesteps_broadcast(cosine):
    x0 = images(2)
    noise = images(3)
    out = cosine.add_noise(x0, noise, torch.tensor([100, 700]))  # (B,)
    torch.testing.assert_close(out[1], cosine.add_noise(x0[1], noise[1], 700))
    torch.testing.assert_close(out[0], cosine.add_noise(x0[0], noise[0], 100))


def test_bad_timesteps_are_reported(cosine):
    x0 = images(0)
    with pytest.raises(IndexError, match=r"\[0, 999\].*1000"):
        cosine.add_noise(x0, x0, 1000)
    with pytest.raises(IndexError, match="-1"):
        cosine.add_noise(x0, x0, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"t of shape \(3,\)"):
        cosine.add_noise(x0, x0, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        cosine.add_noise(x0, x0, torch.tensor([0.5, 0.2]))


def test_eps_x0_round_trip(cosine):
    x0, eps = images(4), torch.randn(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([[20, 400, 800], [0, 999, 600]])
    x_t = cosine.add_noise(x0, eps, t)
    torch.testing.assert_close(cosine.eps_from_x0(x_t, x0, t), eps, rtol=0, atol=1e-4)
    t_mid = torch.tensor([[20, 400, 800], [100, 300, 600]])
    x_t = cosine.add_noise(x0, eps, t_mid)
    torch.testing.assert_close(cosine.x0_from_eps(x_t, eps, t_mid), x0, rtol=0, atol=1e-4)


def test_snr_and_min_snr_weight_by_hand(cosine, linear):
    t = torch.tensor([0, 300, 500, 900])
    snr_hand = [cosine_abar(int(i)) / (1 - cosine_abar(int(i))) for i in t]
    torch.testing.assert_close(cosine.snr(t).double(), torch.tensor(snr_hand, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    # At t=500 abar ~ 0.4923, SNR ~ 0.9696 < 5: the weight is the SNR itself.
    assert snr_hand[2] == pytest.approx(0.9696, abs=1e-3)
    weights = cosine.min_snr_weight(t, gamma=5.0)
    expected = torch.tensor([5.0, min(snr_hand[1], 5.0), snr_hand[2], snr_hand[3]])
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=0)
    assert weights[0].item() == 5.0 and weights[3].item() < 0.1
    # Linear, t=0: SNR = (1 - 1e-4) / 1e-4 = 9999, capped at gamma.
    assert linear.snr(0).item() == pytest.approx(9999.0, rel=1e-3)
    assert linear.min_snr_weight(0, gamma=2.0).item() == 2.0
    assert torch.equal(cosine.min_snr_weight(t, gamma=None), torch.ones(4))
    per_view = cosine.min_snr_weight(torch.tensor([[0, 500]]))
    assert per_view.shape == (1, 2)
    assert per_view[0, 1].item() == pytest.approx(snr_hand[2], rel=1e-4)


# ---------------------------------------------------------------- guidance


def test_guidance_identities():
    x_t, c, u = images(6), images(7), images(8)
    t = torch.tensor([[500, 500, 0], [700, 700, 0]])
    torch.testing.assert_close(guided_x0(x_t, t, c, u, 0.0), c)
    torch.testing.assert_close(guided_x0(x_t, t, c, u, -1.0), u)
    with pytest.raises(ValueError, match="x0_uncond"):
        guided_x0(x_t, t, c, u[:, :2], 1.0)


def test_guidance_w1_by_hand(cosine):
    t, x_t = 500, torch.tensor([0.3])
    a, b = math.sqrt(cosine_abar(t)), math.sqrt(1 - cosine_abar(t))
    eps_c, eps_u = (0.3 - a * 0.5) / b, (0.3 - a * 0.1) / b
    eps = 2 * eps_c - eps_u
    x0_hand = (0.3 - b * eps) / a
    assert x0_hand == pytest.approx(0.9, abs=1e-9)
    out = guided_x0(x_t, t, torch.tensor([0.5]), torch.tensor([0.1]), 1.0)
    assert out.item() == pytest.approx(x0_hand, abs=1e-6)


def test_guidance_equals_route_through_eps(cosine):
    x_t, c, u = images(9), images(10), images(11)
    t = torch.tensor([[100, 400, 800], [50, 600, 900]])
    w = 2.5
    eps = (1 + w) * cosine.eps_from_x0(x_t, c, t) - w * cosine.eps_from_x0(x_t, u, t)
    torch.testing.assert_close(guided_x0(x_t, t, c, u, w), cosine.x0_from_eps(x_t, eps, t),
                               rtol=0, atol=1e-4)


# ---------------------------------------------------------------- samplers


def test_set_timesteps_leading_spacing(cosine):
    ddim = DDIMScheduler(cosine)
    ddim.set_timesteps(50)
    assert ddim.timesteps.dtype == torch.long
    assert ddim.timesteps[:3].tolist() == [980, 960, 940] and ddim.timesteps[-1].item() == 0
    assert len(ddim.timesteps) == 50
    ddim.set_timesteps(3)
    assert ddim.timesteps.tolist() == [666, 333, 0]
    with pytest.raises(ValueError, match="num_inference_steps.*1001"):
        ddim.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMScheduler(cosine).set_timesteps(0)


def test_steps_offset_keeps_noisy_steps_off_t0(cosine):
    ddpm = DDPMScheduler(cosine, steps_offset=1)
    assert ddpm.timesteps[0].item() == 999 and ddpm.timesteps[-1].item() == 1
    assert len(ddpm.timesteps) == 999
    ddpm.set_timesteps(50)
    assert ddpm.timesteps[:2].tolist() == [981, 961] and ddpm.timesteps[-1].item() == 1
    with pytest.raises(ValueError, match="steps_offset 1"):
        ddpm.set_timesteps(1000)
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMScheduler(cosine, steps_offset=1000)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddim_deterministic_loop_with_oracle_ends_at_x0(kind, prediction_type, steps_offset):
    schedule = NoiseSchedule(kind)
    ddim = DDIMScheduler(schedule, steps_offset=steps_offset)
    ddim.set_timesteps(50)
    x0 = images(12, low=-0.95, high=0.95)
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13))
    for t in ddim.timesteps:
        oracle = x0 if prediction_type == "sample" else schedule.eps_from_x0(x, x0, int(t))
        x = ddim.step(oracle, t, x, prediction_type=prediction_type).prev_sample
    assert (x - x0).abs().max().item() < 1e-4


def test_ddim_single_step_closed_form(cosine):
    ddim = DDIMScheduler(cosine)
    ddim.set_timesteps(50)
    x_t, x0 = images(14, low=-2, high=2), images(15)
    a_t, a_p = cosine_abar(500), cosine_abar(480)
    eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    out = ddim.step(x0, 500, x_t)
    torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-5)
    # eta = 1: sigma^2 = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p), and noise from the generator.
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps + sigma * z
    out = ddim.step(x0, 500, x_t, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-5)


def test_step_clips_x0_only_when_asked(cosine):
    ddim = DDIMScheduler(cosine)
    x_t, x0 = images(16), 3 * images(17)
    assert ddim.step(x0, 500, x_t).pred_original_sample.abs().max().item() == 1.0
    unclipped = ddim.step(x0, 500, x_t, clip_sample=False).pred_original_sample
    assert torch.equal(unclipped, x0)


@pytest.mark.parametrize("sampler_cls", [DDIMScheduler, DDPMScheduler])
def test_step_with_per_view_timesteps_matches_per_view_steps(cosine, sampler_cls):
    sampler = sampler_cls(cosine)
    sampler.set_timesteps(50)
    x_t, x0 = images(18), images(19)
    t = torch.tensor([[980, 500, 0], [20, 500, 960]])
    out = sampler.step(x0, t, x_t, clip_sample=True).prev_sample
    for b in range(2):
        for v in range(3):
            if t[b, v] == 0 or sampler_cls is DDIMScheduler:
                single = sampler.step(x0[b, v], int(t[b, v]), x_t[b, v]).prev_sample
                torch.testing.assert_close(out[b, v], single)
    if sampler_cls is DDIMScheduler:
        assert not torch.allclose(out[0, 1], out[0, 0])


def test_ddpm_step_is_posterior_sample(cosine):
    ddpm = DDPMScheduler(cosine)  # full T-step chain: textbook posterior from the betas
    x_t, x0 = images(20, low=-2, high=2), images(21)
    t = 400
    beta = cosine.betas[t].double().item()
    a_t, a_p = cosine_abar(t), cosine_abar(t - 1)
    c0, ct = math.sqrt(a_p) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t)
    mean = c0 * x0 + ct * x_t
    var = beta * (1 - a_p) / (1 - a_t)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
    out = ddpm.step(x0, t, x_t, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.prev_sample, mean + math.sqrt(var) * z, rtol=0, atol=1e-5)
    with_other_noise = ddpm.step(x0, t, x_t, generator=torch.Generator().manual_seed(8)).prev_sample
    assert (with_other_noise - out.prev_sample).abs().max() > 1e-3


def test_ddpm_skipping_steps_uses_posterior_over_the_gap(linear):
    ddpm = DDPMScheduler(linear)
    ddpm.set_timesteps(10)  # t = 900 -> 800
    x_t, x0 = images(22), images(23)
    a_t, a_p = linear_abar(900), linear_abar(800)
    alpha = a_t / a_p
    c0, ct = math.sqrt(a_p) * (1 - alpha) / (1 - a_t), math.sqrt(alpha) * (1 - a_p) / (1 - a_t)
    mean = c0 * x0 + ct * x_t
    var = (1 - a_p) / (1 - a_t) * (1 - alpha)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9))
    out = ddpm.step(x0, 900, x_t, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out.prev_sample, mean + math.sqrt(var) * z, rtol=0, atol=1e-5)


def test_ddpm_last_step_returns_x0_without_noise(cosine):
    ddpm = DDPMScheduler(cosine)
    ddpm.set_timesteps(50)
    x_t, x0 = images(24), images(25)
    out = ddpm.step(x0, 0, x_t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample, x0, rtol=0, atol=1e-6)


def test_bad_prediction_type_and_ddpm_eta_are_named(cosine):
    x = images(0)
    with pytest.raises(ValueError, match="'v_prediction'"):
        DDIMScheduler(cosine).step(x, 10, x, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="eta=0.5"):
        DDPMScheduler(cosine).step(x, 10, x, eta=0.5)
    assert torch.equal(DDPMScheduler(cosine).step(x, 0, x, eta=0.0).prev_sample, x)


# ---------------------------------------------------------------- settings


def test_settings_defaults_and_factories():
    settings = DiffusionSettings()
    assert (settings.schedule, settings.timesteps, settings.min_snr_gamma) == ("cosine", 1000, 5.0)
    assert (settings.sampler, settings.sampling_steps, settings.eta) == ("ddim", 50, 0.0)
    assert settings.self_condition_prob == 0.5 and settings.guidance == 0.0 and settings.clip_x0
    assert all(f.description for f in DiffusionSettings.model_fields.values())
    schedule = make_schedule(settings)
    sampler = make_scheduler(settings, schedule)
    assert isinstance(sampler, DDIMScheduler) and len(sampler.timesteps) == 50
    # t = 0 is the clean-view timestep, so the engine's sampler never visits it
    assert sampler.timesteps[0].item() == 981 and sampler.timesteps[-1].item() == 1
    ddpm = make_scheduler(DiffusionSettings(sampler="ddpm", sampling_steps=10, timesteps=100),
                          NoiseSchedule("linear", 100))
    assert isinstance(ddpm, DDPMScheduler) and ddpm.timesteps.tolist()[:2] == [91, 81]
    longest = make_scheduler(DiffusionSettings(sampling_steps=999), schedule)
    assert longest.timesteps[0].item() == 999 and longest.timesteps[-1].item() == 1


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"timesteps": 0}, "timesteps"),
        ({"sampling_steps": -1}, "sampling_steps"),
        ({"self_condition_prob": 1.5}, "self_condition_prob"),
        ({"self_condition_prob": -0.1}, "self_condition_prob"),
        ({"sampler": "euler"}, "sampler"),
        ({"sampling_steps": 1000}, "sampling_steps"),
        ({"sampler": "ddpm", "eta": 0.5}, "eta"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
        ({"steps": 10}, "steps"),
    ],
)
def test_settings_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        DiffusionSettings(**changes)


# ---------------------------------------------------------------- parity with diffusers

DIFFUSERS_BETAS = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def _import_diffusers():
    # Skips also when diffusers is installed but fails to import (e.g. against this torch).
    try:
        import diffusers
    except ImportError as error:
        pytest.skip(f"diffusers is not importable: {error}")
    return diffusers


def _parity_steps(ours, theirs, prediction_type, step_kwargs, seed):
    torch.testing.assert_close(
        ours.schedule.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-7
    )
    # diffusers accumulates abar in float32, vsd in float64: near t = 0, 1 - abar then differs
    # by ~1e-3 relative. Sharing diffusers' table leaves only the step maths to compare.
    ours.schedule.alphas_cumprod = theirs.alphas_cumprod.clone()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 3, 4, 4, generator=g)
    picked = theirs.timesteps[[0, 1, len(theirs.timesteps) // 2, -2, -1]]
    for i, t in enumerate(picked):
        model_output = 1.3 * torch.randn(x.shape, generator=g)  # beyond [-1, 1]: clipping matters
        gen = torch.Generator().manual_seed(i)
        a = theirs.step(model_output, t, x, generator=gen, **step_kwargs)
        b = ours.step(model_output, int(t), x, prediction_type=prediction_type,
                      generator=torch.Generator().manual_seed(i), **step_kwargs)
        torch.testing.assert_close(
            b.pred_original_sample, a.pred_original_sample, rtol=0, atol=1e-5
        )
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddim_parity_with_diffusers(kind, prediction_type, eta, set_alpha_to_one, steps_offset):
    diffusers = _import_diffusers()
    theirs = diffusers.DDIMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_BETAS[kind], prediction_type=prediction_type,
        clip_sample=True, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
        timestep_spacing="leading",
    )
    ours = DDIMScheduler(NoiseSchedule(kind), steps_offset, set_alpha_to_one=set_alpha_to_one)
    theirs.set_timesteps(50)
    ours.set_timesteps(50)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    _parity_steps(ours, theirs, prediction_type, {"eta": eta}, seed=31)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddpm_parity_with_diffusers(kind, prediction_type, steps_offset):
    diffusers = _import_diffusers()
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_BETAS[kind], prediction_type=prediction_type,
        clip_sample=True, variance_type="fixed_small", timestep_spacing="leading",
        steps_offset=steps_offset,
    )
    ours = DDPMScheduler(NoiseSchedule(kind), steps_offset=steps_offset)
    theirs.set_timesteps(50)
    ours.set_timesteps(50)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    _parity_steps(ours, theirs, prediction_type, {}, seed=37)
    x0, noise = images(40), images(41)
    t = torch.tensor([5, 640])
    torch.testing.assert_close(ours.schedule.add_noise(x0, noise, t),
                               theirs.add_noise(x0, noise, t), rtol=0, atol=1e-5)
