"""Applications built on the engine: the sampling pipeline behind :mod:`vsd.api`, training,
evaluation, sweeps, reports, refinement, mesh export and the shipped models. They import
:mod:`vsd.core`, the plugins and :mod:`vsd.datatools`; never :mod:`vsd.api` or :mod:`vsd.cli`."""
