"""llamabox server: the `predict` HTTP contract, and the CLI."""
