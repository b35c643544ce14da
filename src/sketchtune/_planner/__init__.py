"""The planner behind ``strategy="global"``: sensitivity -> allocation -> frontier -> real trials.

- :mod:`._options`: each layer's candidates with predicted output error (closed
  form from the spectra of the weight / the activation-weighted weight, or
  measured on a recorded call) and cost (multiply-adds, or the layer timed alone);
- :mod:`._frontier`: the Lagrangian allocation, a frontier of plans from safe to aggressive;
- :mod:`._driver`: bisection of the frontier with real trials, refinement near
  the best plan, storage of the options and the frontier in the study.
"""

from sketchtune._planner._driver import (
    STUDY_ATTR,
    TAG,
    Planner,
    run_planned_study,
)
from sketchtune._planner._frontier import Frontier, allocate
from sketchtune._planner._options import (
    Candidate,
    GroupOptions,
    closed_form_errors,
    observed_layers,
)

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
