"""show1-jax: Show-1 cascaded text-to-video diffusion in JAX/Flax."""

from show1_jax.loading import load_component

__version__ = "0.1.0"
__all__ = ["load_component", "__version__"]
