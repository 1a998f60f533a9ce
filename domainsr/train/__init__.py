"""Training: ``config`` (TrainConfig from YAML), ``datasets`` (leak-free spatial split, on-the-fly
degraded patches, 2.5D planes), ``losses`` and ``trainer`` (``train(config) -> TrainResult``)."""
