"""stedm.models."""
