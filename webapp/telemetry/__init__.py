"""Logs (``logs``) and counted events (``recorder``): the lowest layer above the settings."""
