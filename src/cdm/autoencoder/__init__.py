"""Latent mode's autoencoder: a frozen ``AutoencoderKL`` (a user's, e.g. Stable Diffusion's VAE, or cdm's own small
one trained on public data) behind ``encode`` / ``decode`` / ``scale`` / ``hash``; and its training."""

from .model import AE_WEIGHTS_NAME, Autoencoder, small_autoencoder

__all__ = ["AE_WEIGHTS_NAME", "Autoencoder", "small_autoencoder"]
