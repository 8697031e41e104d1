"""stedm.diffusion."""
