"""The source model: where it comes from, how it loads, its architecture adapter, hooks, checkpoints, chat encoding."""
