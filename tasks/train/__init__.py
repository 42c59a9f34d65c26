"""train: the loader and its augmentations, the Ray Train loop, checkpoints, the report's plots."""
