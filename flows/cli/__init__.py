"""The ``fedround`` command line: :mod:`.main` holds the app, ``run`` and the entry point;
each other module is one command group and registers itself with ``register(app)``.

- :mod:`.distributed` ``deploy``, ``site start``, ``coordinator start``, ``demo provision``
- :mod:`.lifecycle`   ``promote``, ``rollback``, ``lineage``, ``audit``, ``checkpoints ...``
- :mod:`.services`    ``up``, ``down``, ``status``, ``env``, ``credentials``
"""
