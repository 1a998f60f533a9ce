"""Training: ``trainer`` (``train(config) -> TrainResult``), the one ``loop`` (stages, EMA,
validation, checkpoint) with its run ``state``, the ``pairing`` strategies (``single_grid``: HR ->
degraded LR on one grid; ``guided``: two grids, Wald's protocol), ``regions`` (masks, leak-free
split), ``scoring`` (held-out figures), ``sources``, ``config``, ``datasets`` and ``losses``."""
