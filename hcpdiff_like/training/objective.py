"""The diffusion training objective: noise, timesteps, target and loss, as small functions.

`DiffusionObjective.__call__` reads like the math:
    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise
    loss = weight(t) * criterion(model(x_t, t), target(x_0, noise, t))
Options (min-SNR, noise offset, ...) are separate functions it calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def velocity_target(scheduler, latents, noise, timesteps):
    """v = sqrt(a_t) * noise - sqrt(1 - a_t) * x_0 (Salimans & Ho)."""
    return scheduler.get_velocity(latents, noise, timesteps)


@dataclass
class DiffusionObjective:
    noise_scheduler: object
    prediction_type: Optional[str] = None  # None: the scheduler's own (epsilon / v_prediction)
    loss_type: str = "mse"

    def __post_init__(self):
        if self.prediction_type is None:
            self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"objective.prediction_type={self.prediction_type!r}: expected epsilon, "
                             "v_prediction or sample")

    def sample_noise(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        return torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)

    def sample_timesteps(self, batch_size: int, device) -> torch.Tensor:
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (batch_size,), device=device, dtype=torch.long)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return velocity_target(self.noise_scheduler, latents, noise, timesteps)
        return latents

    def criterion(self, prediction, target):
        if self.loss_type == "mse":
            return F.mse_loss(prediction, target, reduction="none")
        if self.loss_type == "l1":
            return F.l1_loss(prediction, target, reduction="none")
        raise ValueError(f"objective.loss_type={self.loss_type!r} is not supported")

    def per_sample_loss(self, prediction, target, timesteps, mask=None) -> torch.Tensor:
        loss = self.criterion(prediction.float(), target.float())
        if mask is not None:
            loss = loss * mask
        return loss.mean(dim=list(range(1, loss.ndim)))
