"""stedm.modules."""
