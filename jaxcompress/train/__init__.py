"""Training: the train loop, sharding, checkpoints, gradients, run directories, provenance."""
