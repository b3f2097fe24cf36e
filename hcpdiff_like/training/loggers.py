"""Loggers: each is a config-group file under cfgs/logger/, several may run at once.

Every logger takes the experiment dir and implements `info(text)`, `scalars(values, step)`,
`image(tag, pil_image, step)`, `resumed(step)` and `close()`. Only the main process builds loggers.
`LossMeter` keeps the loss numbers they report (and is saved with the training state).
"""
from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Optional


class BaseLogger:
    def __init__(self, exp_dir: str, log_step: int = 10, run_config: Optional[dict] = None):
        self.exp_dir = Path(exp_dir)
        self.log_step = max(1, int(log_step))
        self.run_config = run_config  # the resolved config (secrets scrubbed), for loggers that record it

    def resumed(self, step: int) -> None:
        """The run continues from `step` (drop anything a killed run logged after it)."""

    def info(self, text: str) -> None:
        pass

    def scalars(self, values: dict, step: int) -> None:
        pass

    def image(self, tag: str, image, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleLogger(BaseLogger):
    """Writes messages and scalar lines to the console (stderr) and to `<exp_dir>/<out_path>`."""

    def __init__(self, exp_dir: str, out_path: str = "train.log", log_step: int = 10, console: bool = True,
                 run_config: Optional[dict] = None):
        super().__init__(exp_dir, log_step, run_config)
        self.logger = logging.getLogger(f"hcpdiff_like.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        formatter = logging.Formatter("%(asctime)s | %(message)s", "%Y-%m-%d %H:%M:%S")
        self.handlers = []
        if out_path:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.exp_dir / out_path, encoding="utf-8")
            handler.setFormatter(formatter)
            self.handlers.append(handler)
        if console:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(formatter)
            self.handlers.append(handler)
        for handler in self.handlers:
            self.logger.addHandler(handler)

    def info(self, text: str) -> None:
        self.logger.info(text)

    def scalars(self, values: dict, step: int) -> None:
        body = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        self.logger.info(f"step {step}: {body}")

    def close(self) -> None:
        for handler in self.handlers:
            handler.close()
            self.logger.removeHandler(handler)


class TensorBoardLogger(BaseLogger):
    """Scalars and images to `<exp_dir>/tblog/`."""

    def __init__(self, exp_dir: str, out_dir: str = "tblog", log_step: int = 5, run_config: Optional[dict] = None):
        super().__init__(exp_dir, log_step, run_config)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(self.exp_dir / out_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def resumed(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()  # purge_step hides events a killed run wrote after the saved state
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=step + 1)

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, image, step: int) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(BaseLogger):
    """Weights & Biases. Works offline with WANDB_MODE=offline. The API key is read by wandb from
    the environment or its own login file, never from our config, so it never lands in cfg.yaml.
    The run id is kept in `<exp_dir>/wandb_run_id`, so a resumed experiment continues the same W&B run."""

    ID_FILE = "wandb_run_id"

    def __init__(self, exp_dir: str, project: str = "hcpdiff_like", name: Optional[str] = None,
                 mode: Optional[str] = None, log_step: int = 10, entity: Optional[str] = None,
                 tags: Optional[list] = None, run_config: Optional[dict] = None):
        super().__init__(exp_dir, log_step, run_config)
        try:
            import wandb
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("logger=wandb needs the wandb package: pip install wandb") from error
        self.wandb = wandb
        id_file = self.exp_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, entity=entity, name=name or self.exp_dir.name, id=run_id,
                              resume="allow", dir=str(self.exp_dir), mode=mode or os.environ.get("WANDB_MODE"),
                              config=run_config, tags=list(tags) if tags else None)

    def scalars(self, values: dict, step: int) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class LoggerGroup:
    """Fan out to several loggers; each only sees scalars on its own `log_step`."""

    def __init__(self, loggers: list[BaseLogger]):
        self.loggers = loggers

    def info(self, text: str) -> None:
        for logger in self.loggers:
            logger.info(text)

    def scalars(self, values: dict, step: int, force: bool = False) -> None:
        for logger in self.loggers:
            if force or step % logger.log_step == 0:
                logger.scalars(values, step)

    def image(self, tag: str, image, step: int) -> None:
        for logger in self.loggers:
            logger.image(tag, image, step)

    def resumed(self, step: int) -> None:
        for logger in self.loggers:
            getattr(logger, "resumed", lambda _: None)(step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class LossMeter:
    """Loss bookkeeping: last value, HCP's smoothed curve (EMA 0.93), the run's mean, skipped steps, and the
    per-step history `(step, loss, smoothed)` that the loss-curve picture is drawn from."""

    def __init__(self, smoothing: float = 0.93):
        self.smoothing = smoothing
        self.last: Optional[float] = None
        self.smoothed: Optional[float] = None
        self.total, self.count, self.skipped = 0.0, 0, 0
        self.history: list[tuple[int, float, float]] = []

    def update(self, loss: float, step: Optional[int] = None) -> None:
        self.last = loss
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        self.total += loss
        self.count += 1
        self.history.append((self.count if step is None else int(step), loss, self.smoothed))

    def summary(self) -> dict:
        return {"final_loss": self.last if self.last is not None else float("nan"),
                "mean_loss": self.total / self.count if self.count else float("nan"), "skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"last": self.last, "smoothed": self.smoothed, "total": self.total, "count": self.count,
                "skipped": self.skipped, "history": [list(row) for row in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.smoothed = state["last"], state["smoothed"]
        self.total, self.count, self.skipped = float(state["total"]), int(state["count"]), int(state["skipped"])
        self.history = [(int(s), float(l), float(m)) for s, l, m in state.get("history", [])]


def plot_loss_curve(history, path) -> "PIL.Image.Image":
    """loss.png: every step's loss and the smoothed curve; written atomically, returned as a PIL image."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .checkpoints import atomic_write

    steps, losses, smoothed = zip(*history)
    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    axes.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    axes.plot(steps, smoothed, color="#c33", linewidth=1.6, label="smoothed (EMA 0.93)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write(path, lambda temp: Path(temp).write_bytes(buffer.getvalue()))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
