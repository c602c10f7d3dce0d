"""One trainer per mode; ``config.trainer`` names the module ``main`` runs."""
