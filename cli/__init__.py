"""The ``vsd-run`` command line: :mod:`vsd.cli.main` holds the app and the training and sampling
commands; each other command group is one module with ``register(app)`` (data, eval, export,
refine, sweep, pack). Commands parse options and call the same functions as the Python API."""
