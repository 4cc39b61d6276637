"""Coordinator-side building blocks: thin Prefect tasks around the pure core and around I/O
(object store, checkpoints, data contracts, tracking and registry)."""
