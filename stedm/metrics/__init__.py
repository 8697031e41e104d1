"""stedm.metrics."""
