"""stedm.data."""
