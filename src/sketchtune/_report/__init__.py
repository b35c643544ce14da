"""The run's report (private): what ``results.csv``, ``pareto.png``, ``history.png`` and
``summary.md`` show, each figure taken from the study's records.

- ``_mark``: :class:`KeptMark`, the trials the kept plan came from and its confirmed figures;
  :func:`speed_source` (measured or FLOP-model) of a trial's speedup.
- ``_table``: :func:`results_table`, one row per trial (``results.csv``).
- ``_points``: :func:`history_points` and :func:`pareto_points`, what the plots draw.
- ``_plots``: the plots.
- ``_summary``: :class:`RunSummary` and :class:`TimingSetup` (``summary.md``).
- ``_files``: :func:`write_report`.

:mod:`sketchtune.results` is the public surface.
"""
