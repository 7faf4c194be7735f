"""The training and sampling core: config, strategies, modes, trainer, sampling, generation."""
