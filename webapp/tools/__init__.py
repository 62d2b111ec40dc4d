"""The operator's command (``cli``: ``honest-diffusion``) and the retrying client it and scripts use (``client``)."""
