"""The planner behind ``strategy="global"``: sensitivity -> allocation -> frontier -> real trials.

- :mod:`._options`: each layer's candidates with predicted output error and cost:
  :mod:`._errors` (closed form from the spectra of the weight / the
  activation-weighted weight, or measured on a recorded call) and :mod:`._costs`
  (multiply-adds, or the layer timed alone);
- :mod:`._frontier`: the Lagrangian allocation, a frontier of plans from safe to aggressive;
- :mod:`._driver`: the planner: the options and the frontier (stored in the study),
  bisection of the frontier, refinement near the best plan;
- :mod:`._run`: the study run: the planner's proposals as real trials, then the sampler.
"""

from sketchtune._planner._driver import STUDY_ATTR, TAG, Planner
from sketchtune._planner._frontier import Frontier, allocate
from sketchtune._planner._options import (
    Candidate,
    GroupOptions,
    closed_form_errors,
    observed_layers,
)
from sketchtune._planner._run import run_planned_study

__all__ = [
    "STUDY_ATTR",
    "TAG",
    "Candidate",
    "Frontier",
    "GroupOptions",
    "Planner",
    "allocate",
    "closed_form_errors",
    "observed_layers",
    "run_planned_study",
]
