"""The run's report (private): the plots and ``summary.md``.

- ``_plots``: ``pareto.png`` and ``history.png``.
- ``_summary``: :class:`RunSummary` (``summary.md``).

:mod:`sketchtune.results` is the public surface.
"""
