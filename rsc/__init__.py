"""rsc: inference-time correction of racial stereotypes in latent diffusion models."""

__version__ = "0.1.0"
