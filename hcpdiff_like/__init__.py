"""hcpdiff_like: Hydra-configured fine-tuning of Stable-Diffusion-family models."""
__version__ = "0.1.0"
