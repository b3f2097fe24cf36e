"""The diffusion training objective: noise, timesteps, target and loss, as small functions.

One training example, as the trainer computes it (config section `objective:`):

    eps  = sample_noise(x_0)                    # N(0, I) [+ pyramid noise] [+ noise offset]
    t    = sample_timesteps(B)                  # uniform or logit-normal in [min_timestep, max_timestep)
    x_t  = sqrt(a_t) * x_0 + sqrt(1 - a_t) * (eps [+ ip_noise_gamma * N(0, I)])
    loss = weight(t) * mean(mask * criterion(model(x_t, t), target(x_0, eps, t)))
    weight(t) = [min-SNR-gamma] * [debiased estimation] * [v-pred scaled like noise-pred]

Each option is a plain function below, so it can be read and tested on its own.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


class ObjectiveConfigError(ValueError):
    """A bad value in the `objective:` config section; the message names the key."""


# -- noise schedule -------------------------------------------------------------------------------
def zero_terminal_snr_scheduler(scheduler):
    """A copy of `scheduler` whose betas are rescaled so that alpha_bar at the last step is 0 (Lin et al.
    2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"); diffusers implements the rescale."""
    if "rescale_betas_zero_snr" not in inspect.signature(type(scheduler).__init__).parameters:
        raise ObjectiveConfigError(f"objective.zero_terminal_snr: {type(scheduler).__name__} cannot rescale betas")
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def signal_to_noise(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss on the given prediction type.

    x_0 loss: min(SNR, gamma); epsilon loss: min(SNR, gamma) / SNR; v loss: min(SNR, gamma) / (SNR + 1).
    At SNR = 0 (zero-terminal schedule) the epsilon weight is its limit, 1.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def debiased_estimation_weight(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024; kohya's `--debiased_estimation_loss`), SNR clipped at 1000:
    1 / sqrt(SNR) for an epsilon loss, 1 / (SNR + 1) for a v loss."""
    clipped = torch.clamp(snr, max=1000.0)
    if prediction_type == "v_prediction":
        return 1.0 / (clipped + 1.0)
    return 1.0 / torch.sqrt(clipped.clamp(min=1e-20))


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor, scheduler, scale: float = 1.0):
    """Huber c (kohya's `--huber_schedule`): constant c * scale (one number); per sample, exponential
    exp(-a t) * scale with a = -ln(c) / T (c at t = T, 1 at t = 0), or snr (1 - c) / (1 + sigma_t)^2 + c with
    sigma_t = sqrt((1 - a_t) / a_t)."""
    if schedule == "constant":
        return huber_c * scale
    if schedule == "exponential":
        rate = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * scale
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigma = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
    return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c


# -- noise ------------------------------------------------------------------------------------------
def offset_noise(latents: torch.Tensor, noise_offset: float, adaptive_scale: Optional[float] = None,
                 generator=None) -> torch.Tensor:
    """Per-image, per-channel constant noise (Guttenberg's "noise offset"), to add to the Gaussian noise.

    adaptive: the offset grows with the latent's own channel mean, offset = noise_offset + scale * |mean|
    (kohya's `adaptive_noise_scale`), and never goes below 0.
    """
    batch, channels = latents.shape[:2]
    strength = torch.full((batch, channels, 1, 1), float(noise_offset), device=latents.device)
    if adaptive_scale:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = (strength + adaptive_scale * channel_mean).clamp(min=0.0)
    shift = torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device)
    return (strength * shift).to(latents.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator=None) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise: add coarser and coarser Gaussian noise, each level scaled by
    discount**level and upsampled bilinearly, then rescale each image's noise back to unit std."""
    batch, channels, height, width = noise.shape
    result = noise.float().clone()
    for level in range(1, int(iterations) + 1):
        factor = 2.0 + 2.0 * torch.rand((), generator=generator).item()  # a random 2..4x step per level
        coarse_h, coarse_w = max(1, int(height / factor ** level)), max(1, int(width / factor ** level))
        coarse = torch.randn((batch, channels, coarse_h, coarse_w), generator=generator, device=noise.device)
        result += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) \
            * discount ** level
        if coarse_h == 1 or coarse_w == 1:
            break
    result = result / result.std(dim=(1, 2, 3), keepdim=True)
    return result.to(noise.dtype)


# -- timesteps --------------------------------------------------------------------------------------
def sample_timesteps(batch_size: int, low: int, high: int, sampling: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, device=None, generator=None) -> torch.Tensor:
    """Integer timesteps in [low, high). logit_normal: t = low + sigmoid(N(mean, std)) * (high - low)
    (Esser et al. 2024), which concentrates training on the middle of the schedule."""
    if sampling == "uniform":
        return torch.randint(low, high, (batch_size,), generator=generator, dtype=torch.long).to(device)
    fraction = torch.sigmoid(logit_mean + logit_std * torch.randn((batch_size,), generator=generator))
    timesteps = (low + fraction * (high - low)).long().clamp(low, high - 1)
    return timesteps.to(device)


# -- loss -------------------------------------------------------------------------------------------
def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "mse",
                     huber_c: float | torch.Tensor = 0.1) -> torch.Tensor:
    """mse: d^2; l1: |d|; huber (pseudo-Huber, kohya's): 2c * (sqrt(d^2 + c^2) - c); smooth_l1: torch's
    Huber with beta = huber_c. d = prediction - target. A tensor c is per sample ([B])."""
    if isinstance(huber_c, torch.Tensor) and loss_type in ("huber", "smooth_l1"):
        huber_c = huber_c.reshape(-1, *[1] * (prediction.ndim - 1)).to(prediction.device, prediction.dtype)
        if loss_type == "smooth_l1":  # torch's beta is a scalar: the same piecewise formula by hand
            difference = (prediction - target).abs()
            return torch.where(difference < huber_c, 0.5 * difference ** 2 / huber_c, difference - 0.5 * huber_c)
    if loss_type == "mse":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if loss_type == "huber":
        difference = prediction - target
        return 2.0 * huber_c * (torch.sqrt(difference ** 2 + huber_c ** 2) - huber_c)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(prediction, target, reduction="none", beta=huber_c)
    raise ObjectiveConfigError(f"objective.loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


def latent_loss_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel-space mask [B, 1, H, W] in [0, 1] averaged down to the latent grid [B, 1, h, w]."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) != tuple(latent_hw):
        mask = F.interpolate(mask, size=tuple(latent_hw), mode="area")
    return mask


@dataclass
class DiffusionObjective:
    """The `objective:` config section; the trainer calls these methods in the order of the math above."""

    noise_scheduler: object
    prediction_type: Optional[str] = None  # None: the scheduler's own (epsilon / v_prediction)
    loss_type: str = "mse"
    huber_c: float = 0.1
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    adaptive_noise_scale: Optional[float] = None
    pyramid_noise_iterations: int = 0
    pyramid_noise_discount: float = 0.3
    zero_terminal_snr: bool = False
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_timestep: int = 0
    max_timestep: Optional[int] = None  # exclusive; None = num_train_timesteps
    noise_offset_random_strength: bool = False  # offset x U(0, 1) per step (kohya)
    ip_noise_gamma: Optional[float] = None  # input perturbation (Ning et al. 2023): x_t from eps + gamma * N(0, I)
    ip_noise_gamma_random_strength: bool = False  # gamma x U(0, 1) per step
    debiased_estimation: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    huber_schedule: str = "constant"
    huber_scale: float = 1.0

    def __post_init__(self):
        if self.prediction_type is None:
            self.prediction_type = self.noise_scheduler.config.prediction_type
        self._check()
        if self.zero_terminal_snr:
            self.noise_scheduler = zero_terminal_snr_scheduler(self.noise_scheduler)

    def _check(self) -> None:
        steps = self.noise_scheduler.config.num_train_timesteps
        self.max_timestep = steps if self.max_timestep is None else int(self.max_timestep)
        self.min_timestep = int(self.min_timestep or 0)
        choices = {"prediction_type": PREDICTION_TYPES, "loss_type": LOSS_TYPES,
                   "timestep_sampling": TIMESTEP_SAMPLING, "huber_schedule": HUBER_SCHEDULES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ObjectiveConfigError(f"objective.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if not 0 <= self.min_timestep < self.max_timestep <= steps:
            raise ObjectiveConfigError(f"objective.min_timestep={self.min_timestep}, max_timestep="
                                       f"{self.max_timestep}: need 0 <= min < max <= {steps}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ObjectiveConfigError(f"objective.min_snr_gamma={self.min_snr_gamma}: must be > 0 (or null)")
        if self.loss_type in ("huber", "smooth_l1") and not self.huber_c > 0:
            raise ObjectiveConfigError(f"objective.huber_c={self.huber_c}: must be > 0")
        if self.huber_schedule == "exponential" and not 0 < self.huber_c < 1:
            raise ObjectiveConfigError(f"objective.huber_c={self.huber_c}: the exponential schedule needs 0 < c < 1")
        if self.ip_noise_gamma is not None and self.ip_noise_gamma < 0:
            raise ObjectiveConfigError(f"objective.ip_noise_gamma={self.ip_noise_gamma}: must be >= 0 (or null)")
        if self.scale_v_pred_loss_like_noise_pred and self.prediction_type != "v_prediction":
            raise ObjectiveConfigError("objective.scale_v_pred_loss_like_noise_pred=true needs prediction_type "
                                       f"v_prediction (this run predicts {self.prediction_type})")

    # -- x_t ------------------------------------------------------------------------------------
    def sample_noise(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.pyramid_noise_iterations:
            noise = pyramid_noise(noise, self.pyramid_noise_iterations, self.pyramid_noise_discount, generator)
        if self.noise_offset or self.adaptive_noise_scale:
            offset = self.noise_offset
            if self.noise_offset_random_strength:
                offset = offset * torch.rand((), generator=generator).item()
            noise = noise + offset_noise(latents, offset, self.adaptive_noise_scale, generator)
        return noise

    def training_input(self, latents, noise, timesteps, generator=None) -> torch.Tensor:
        """x_t for a training step: like `add_noise`, but with the input perturbation (ip_noise_gamma) added
        to the noise that makes x_t only; the target keeps the unperturbed noise. Validation uses add_noise."""
        if self.ip_noise_gamma:
            gamma = self.ip_noise_gamma
            if self.ip_noise_gamma_random_strength:
                gamma = gamma * torch.rand((), generator=generator).item()
            perturbation = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            noise = noise + gamma * perturbation
        return self.add_noise(latents, noise, timesteps)

    def sample_timesteps(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        return sample_timesteps(batch_size, self.min_timestep, self.max_timestep, self.timestep_sampling,
                                self.logit_mean, self.logit_std, device=device, generator=generator)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    # -- target and loss ------------------------------------------------------------------------
    def target(self, latents, noise, timesteps):
        """epsilon: the noise; v_prediction: sqrt(a_t) * noise - sqrt(1 - a_t) * x_0; sample: x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return latents

    def timestep_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight: the product of min-SNR-gamma, debiased estimation and the v-pred scaling
        that are switched on (kohya applies them one after the other); 1 when none is."""
        weight = torch.ones(timesteps.shape, device=timesteps.device)
        if not (self.min_snr_gamma is not None or self.debiased_estimation or self.scale_v_pred_loss_like_noise_pred):
            return weight
        snr = signal_to_noise(self.noise_scheduler, timesteps)
        if self.min_snr_gamma is not None:
            weight = weight * min_snr_weight(snr, float(self.min_snr_gamma), self.prediction_type)
        if self.scale_v_pred_loss_like_noise_pred:  # a v loss weighted like an epsilon loss: x SNR / (SNR + 1)
            weight = weight * snr / (snr + 1.0)
        if self.debiased_estimation:
            weight = weight * debiased_estimation_weight(snr, self.prediction_type)
        return weight

    def per_sample_loss(self, prediction, target, timesteps, mask=None) -> torch.Tensor:
        """[B] losses: criterion per element, times the (latent-size) mask, averaged, times the SNR weight."""
        huber_c = self.huber_c
        if self.loss_type in ("huber", "smooth_l1"):  # a number, or one c per sample (huber_schedule)
            huber_c = huber_threshold(self.huber_schedule, self.huber_c, timesteps, self.noise_scheduler,
                                      self.huber_scale)
        loss = elementwise_loss(prediction.float(), target.float(), self.loss_type, huber_c)
        if mask is not None:
            loss = loss * latent_loss_mask(mask.to(loss.device), loss.shape[-2:])
        loss = loss.mean(dim=list(range(1, loss.ndim)))
        return loss * self.timestep_weight(timesteps).to(loss.device)
