"""The coordinator: the training flow (one round after another), the CLI, site dispatch."""
