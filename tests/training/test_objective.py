"""Each objective option against an independent formula, on the tiny models' real noise schedules."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from hcpdiff_like.training.objective import DiffusionObjective, ObjectiveConfigError, elementwise_loss


@pytest.fixture(scope="module")
def schedulers(tiny_sd1, tiny_sd2):
    return {"sd1": DDPMScheduler.from_pretrained(tiny_sd1 / "scheduler"),
            "sd2": DDPMScheduler.from_pretrained(tiny_sd2 / "scheduler")}


def hand_alpha_bar(config) -> torch.Tensor:
    """scaled_linear betas, computed from the scheduler config by hand: cumprod(1 - beta)."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def sample_batch(seed=0, shape=(3, 4, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_targets_and_noising_match_hand_formulas(schedulers):
    scheduler = schedulers["sd2"]
    assert scheduler.config.prediction_type == "v_prediction"
    objective = DiffusionObjective(scheduler)  # prediction type from the scheduler config
    assert objective.prediction_type == "v_prediction"
    x0, noise = sample_batch()
    timesteps = torch.tensor([0, 499, 999])
    alpha_bar = hand_alpha_bar(scheduler.config)[timesteps].float().view(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    torch.testing.assert_close(objective.add_noise(x0, noise, timesteps), alpha * x0 + sigma * noise)
    torch.testing.assert_close(objective.target(x0, noise, timesteps), alpha * noise - sigma * x0)
    assert torch.equal(DiffusionObjective(scheduler, prediction_type="epsilon").target(x0, noise, timesteps), noise)
    assert torch.equal(DiffusionObjective(scheduler, prediction_type="sample").target(x0, noise, timesteps), x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_paper(schedulers, prediction_type):
    gamma = 5.0
    scheduler = schedulers["sd1"]
    objective = DiffusionObjective(scheduler, prediction_type=prediction_type, min_snr_gamma=gamma)
    timesteps = torch.tensor([0, 50, 200, 500, 999])
    alpha_bar = hand_alpha_bar(scheduler.config)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    expected = {"epsilon": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr,
                "v_prediction": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1),
                "sample": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))}[prediction_type]
    torch.testing.assert_close(objective.timestep_weight(timesteps).double(), expected, rtol=1e-5, atol=1e-7)
    # per-sample loss = plain MSE * weight
    prediction, target = sample_batch(1, (5, 4, 8, 8))
    plain = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(objective.per_sample_loss(prediction, target, timesteps),
                               plain * expected.float(), rtol=1e-4, atol=1e-7)
    if prediction_type == "epsilon":  # low-noise steps (SNR > gamma) are down-weighted, noisy ones keep 1
        weights = objective.timestep_weight(timesteps)
        assert weights[0] < 0.01 and weights[-1] == 1.0


def test_zero_terminal_snr_rescale(schedulers):
    scheduler = schedulers["sd2"]
    objective = DiffusionObjective(scheduler, zero_terminal_snr=True)
    rescaled = objective.noise_scheduler.alphas_cumprod.double()
    assert rescaled[-1].item() == 0.0
    # Lin et al. 2023, Algorithm 1: sqrt(alpha_bar) shifted so the last is 0 and scaled so the first is unchanged
    root = hand_alpha_bar(scheduler.config).sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    torch.testing.assert_close(rescaled, expected, rtol=1e-4, atol=1e-6)
    assert scheduler.alphas_cumprod[-1] > 0  # the original scheduler is untouched
    # at t = T: x_t is pure noise, the v target is -x_0, min-SNR weights stay finite
    x0, noise = sample_batch()
    last = torch.full((3,), 999)
    torch.testing.assert_close(objective.add_noise(x0, noise, last), noise)
    torch.testing.assert_close(objective.target(x0, noise, last), -x0)
    for prediction_type in ("epsilon", "v_prediction"):
        weight = DiffusionObjective(scheduler, prediction_type=prediction_type, zero_terminal_snr=True,
                                    min_snr_gamma=5.0).timestep_weight(last)
        assert torch.isfinite(weight).all()


def test_loss_types_match_their_formulas():
    prediction = torch.tensor([0.0, 3.0, -0.05, 10.0])
    target = torch.zeros(4)
    c = 4.0
    # pseudo-Huber 2c(sqrt(d^2 + c^2) - c): d = 3, c = 4 gives 2*4*(5 - 4) = 8
    huber = elementwise_loss(prediction, target, "huber", huber_c=c)
    assert huber[0] == 0 and huber[1].item() == pytest.approx(8.0)
    assert huber[3].item() == pytest.approx(2 * c * (math.sqrt(100 + 16) - c))
    small_c = elementwise_loss(prediction, target, "huber", huber_c=0.01)  # ~ 2c|d| far from 0
    assert small_c[3].item() == pytest.approx(2 * 0.01 * 10, rel=1e-3)
    torch.testing.assert_close(elementwise_loss(prediction, target, "mse"), prediction ** 2)
    torch.testing.assert_close(elementwise_loss(prediction, target, "l1"), prediction.abs())
    smooth = elementwise_loss(prediction, target, "smooth_l1", huber_c=1.0)
    torch.testing.assert_close(smooth, torch.tensor([0.0, 2.5, 0.5 * 0.05 ** 2, 9.5]))


def test_logit_normal_timesteps_have_the_requested_distribution(schedulers):
    objective = DiffusionObjective(schedulers["sd1"], timestep_sampling="logit_normal", logit_mean=0.3,
                                   logit_std=0.8)
    timesteps = objective.sample_timesteps(40000, generator=torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() < 1000
    fraction = (timesteps.double() + 0.5) / 1000
    logits = torch.log(fraction / (1 - fraction))
    assert logits.mean().item() == pytest.approx(0.3, abs=0.02)
    assert logits.std().item() == pytest.approx(0.8, abs=0.02)
    assert timesteps.double().median().item() == pytest.approx(1000 / (1 + math.exp(-0.3)), abs=10)


def test_timestep_range_limits(schedulers):
    objective = DiffusionObjective(schedulers["sd1"], min_timestep=200, max_timestep=400)
    timesteps = objective.sample_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert timesteps.min().item() == 200 and timesteps.max().item() == 399
    ranged = DiffusionObjective(schedulers["sd1"], timestep_sampling="logit_normal", min_timestep=100,
                                max_timestep=300).sample_timesteps(5000, generator=torch.Generator().manual_seed(1))
    assert 100 <= ranged.min().item() and ranged.max().item() < 300


def test_noise_offset_and_adaptive_scale(schedulers):
    latents = torch.full((20000, 1, 4, 4), 2.0)  # channel mean 2
    objective = DiffusionObjective(schedulers["sd1"], noise_offset=0.1, adaptive_noise_scale=0.5)
    noise = objective.sample_noise(latents, generator=torch.Generator().manual_seed(0))
    # mean over the 16 pixels: Gaussian part has variance 1/16, the constant offset (0.1 + 0.5 * 2)^2
    variance = noise.mean(dim=(2, 3)).var().item()
    assert variance == pytest.approx(1 / 16 + 1.1 ** 2, rel=0.05)
    plain = DiffusionObjective(schedulers["sd1"]).sample_noise(latents, generator=torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 16, rel=0.05)


def test_pyramid_noise_is_unit_variance_and_spatially_correlated(schedulers):
    latents = torch.zeros(16, 4, 64, 64)
    objective = DiffusionObjective(schedulers["sd1"], pyramid_noise_iterations=6, pyramid_noise_discount=0.8)
    noise = objective.sample_noise(latents, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.std(dim=(1, 2, 3)), torch.ones(16), atol=1e-4, rtol=0)

    def neighbour_correlation(x):
        left, right = x[..., :-1].flatten(), x[..., 1:].flatten()
        return torch.corrcoef(torch.stack([left, right]))[0, 1].item()

    white = DiffusionObjective(schedulers["sd1"]).sample_noise(latents, generator=torch.Generator().manual_seed(0))
    assert abs(neighbour_correlation(white)) < 0.02
    assert neighbour_correlation(noise) > 0.2


def test_loss_mask_is_downsampled_to_latents(schedulers):
    objective = DiffusionObjective(schedulers["sd1"], prediction_type="epsilon")
    target = torch.zeros(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., :32] = 1.0  # pixel-space mask: left half counts
    right_error = torch.zeros_like(target)
    right_error[..., 4:] = 1.0
    left_error = 1.0 - right_error
    timesteps = torch.tensor([10, 900])
    assert objective.per_sample_loss(right_error, target, timesteps, mask).abs().max() == 0
    torch.testing.assert_close(objective.per_sample_loss(left_error, target, timesteps, mask), torch.full((2,), 0.5))
    torch.testing.assert_close(objective.per_sample_loss(left_error, target, timesteps), torch.full((2,), 0.5))


@pytest.mark.parametrize("options, key", [({"loss_type": "l3"}, "loss_type"),
                                          ({"prediction_type": "flow"}, "prediction_type"),
                                          ({"timestep_sampling": "cosine"}, "timestep_sampling"),
                                          ({"min_timestep": 500, "max_timestep": 400}, "min_timestep"),
                                          ({"min_snr_gamma": 0}, "min_snr_gamma"),
                                          ({"huber_schedule": "cosine"}, "huber_schedule"),
                                          ({"huber_schedule": "exponential", "huber_c": 1.5}, "huber_c"),
                                          ({"ip_noise_gamma": -0.1}, "ip_noise_gamma"),
                                          ({"scale_v_pred_loss_like_noise_pred": True},
                                           "scale_v_pred_loss_like_noise_pred")])
def test_bad_objective_values_name_the_key(schedulers, options, key):
    with pytest.raises(ObjectiveConfigError, match=f"objective.{key}"):
        DiffusionObjective(schedulers["sd1"], **options)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_and_v_scaling_weights(schedulers, prediction_type):
    scheduler = schedulers["sd2"]
    timesteps = torch.tensor([0, 50, 500, 999])
    alpha_bar = hand_alpha_bar(scheduler.config)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=1000.0)
    debiased = 1 / (clipped + 1) if prediction_type == "v_prediction" else 1 / clipped.sqrt()
    objective = DiffusionObjective(scheduler, prediction_type=prediction_type, debiased_estimation=True)
    torch.testing.assert_close(objective.timestep_weight(timesteps).double(), debiased, rtol=1e-4, atol=1e-9)
    assert snr[0] > 1000  # t = 0 is past the clip, so the clip is exercised
    if prediction_type == "v_prediction":  # everything on: the weights multiply, as kohya applies them in turn
        both = DiffusionObjective(scheduler, min_snr_gamma=5.0, debiased_estimation=True,
                                  scale_v_pred_loss_like_noise_pred=True)
        min_snr = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
        torch.testing.assert_close(both.timestep_weight(timesteps).double(), min_snr * snr / (snr + 1) * debiased,
                                   rtol=1e-4, atol=1e-9)


def test_huber_schedules_give_each_timestep_its_own_c(schedulers):
    scheduler = schedulers["sd1"]
    timesteps = torch.tensor([0, 500, 999])
    prediction, target = sample_batch(2, (3, 4, 8, 8))
    steps = scheduler.config.num_train_timesteps
    alpha_bar = hand_alpha_bar(scheduler.config)[timesteps]
    expected_c = {"constant": torch.full((3,), 0.1 * 2.0, dtype=torch.float64),
                  "exponential": torch.exp(math.log(0.1) / steps * timesteps.double()) * 2.0,  # 1 at t=0, c at t=T
                  "snr": (1 - 0.1) / (1 + ((1 - alpha_bar) / alpha_bar).sqrt()) ** 2 + 0.1}
    for schedule, c in expected_c.items():
        objective = DiffusionObjective(scheduler, prediction_type="epsilon", loss_type="huber", huber_c=0.1,
                                       huber_schedule=schedule, huber_scale=2.0)
        d = (prediction - target).double()
        c4 = c.view(-1, 1, 1, 1)
        expected = (2 * c4 * (torch.sqrt(d ** 2 + c4 ** 2) - c4)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(objective.per_sample_loss(prediction, target, timesteps).double(), expected,
                                   rtol=1e-5, atol=1e-7)
    # smooth_l1 with a per-sample beta: 0.5 d^2 / beta below beta, |d| - beta / 2 above
    objective = DiffusionObjective(scheduler, prediction_type="epsilon", loss_type="smooth_l1", huber_c=0.1,
                                   huber_schedule="exponential")
    d = (prediction - target).abs().double()
    beta = expected_c["exponential"].view(-1, 1, 1, 1) / 2.0
    expected = torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean(dim=(1, 2, 3))
    torch.testing.assert_close(objective.per_sample_loss(prediction, target, timesteps).double(), expected,
                               rtol=1e-5, atol=1e-7)


def test_input_perturbation_noises_x_t_but_not_the_target(schedulers):
    scheduler = schedulers["sd1"]
    x0, noise = sample_batch(3)
    timesteps = torch.tensor([100, 500, 900])
    plain = DiffusionObjective(scheduler, prediction_type="epsilon")
    assert torch.equal(plain.training_input(x0, noise, timesteps), plain.add_noise(x0, noise, timesteps))
    perturbed = DiffusionObjective(scheduler, prediction_type="epsilon", ip_noise_gamma=0.1)
    generator = torch.Generator().manual_seed(7)
    x_t = perturbed.training_input(x0, noise, timesteps, generator=generator)
    extra = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    alpha_bar = hand_alpha_bar(scheduler.config)[timesteps].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * (noise + 0.1 * extra))
    assert torch.equal(perturbed.target(x0, noise, timesteps), noise)  # the model still predicts eps
    # random strength: gamma x U(0, 1), drawn before the perturbation
    random = DiffusionObjective(scheduler, prediction_type="epsilon", ip_noise_gamma=0.1,
                                ip_noise_gamma_random_strength=True)
    generator = torch.Generator().manual_seed(7)
    x_t = random.training_input(x0, noise, timesteps, generator=generator)
    replay = torch.Generator().manual_seed(7)
    strength = torch.rand((), generator=replay).item()
    extra = torch.randn(noise.shape, generator=replay)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * (noise + 0.1 * strength * extra))


def test_noise_offset_random_strength_scales_the_offset(schedulers):
    scheduler = schedulers["sd1"]
    latents = torch.zeros(2, 4, 8, 8)
    fixed = DiffusionObjective(scheduler, noise_offset=0.5)
    scaled = DiffusionObjective(scheduler, noise_offset=0.5, noise_offset_random_strength=True)
    base = fixed.sample_noise(latents, generator=torch.Generator().manual_seed(1))
    varied = scaled.sample_noise(latents, generator=torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    gaussian = torch.randn(latents.shape, generator=replay)
    strength = torch.rand((), generator=replay).item()
    shift = torch.randn((2, 4, 1, 1), generator=replay)
    torch.testing.assert_close(varied, gaussian + 0.5 * strength * shift)
    assert not torch.allclose(base, varied)
