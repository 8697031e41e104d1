"""stedm.losses."""
