"""The search behind :class:`~sketchtune.tuner.SKAutoTuner` (private).

- ``_studies``: configs -> layer groups -> Optuna studies; trials <-> plans.
- ``_fit``: search spaces fitted to each layer.
- ``_builder``: sketched modules for a plan (reused across trials), calibration.
- ``_judge``: evaluating a plan (accuracy, speed) against the floor.
- ``_confirm``: interleaved timing rounds and the never-slower confirmation.
- ``_objective``: the Optuna objective and the per-trial report line.
- ``_strategies``: the search variants (planned global study, the sampler's studies).
- ``_best``: the best trial so far; choosing and confirming the kept plan.
- ``_decision``: the decision a search ends with, and its one-line verdict.
- ``_combine``: a combination of per-layer winners, validated and backed off.
- ``_kept``: what was kept, written into the study (``"sketchtune:kept"``).
- ``_resume``: opening the studies and checking what they hold (fingerprint, weights,
  dense score, floor).
- ``_outcome``: the tuner's results views (the seed's forms) and results files.
- ``_trialinfo``: the one record kept on each Optuna trial.
- ``_fingerprint``: what a study searches, checked on resume.
- ``_results``: results files and the seed's result forms.
- ``_events``: lines, notes, trials and phase progress for listeners.
"""
