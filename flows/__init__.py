"""The coordinator: the training flow (one round after another), site dispatch, promotion,
rollback; the CLI (`cli/`) and the local service stack (`services/`)."""
