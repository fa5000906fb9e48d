"""``longctx compare``: every method trained and evaluated on the same work.

Each preset trains for the same wall-clock budget on the same data and seed (the
learning rate decays over that budget), each in its own run directory under one folder,
then every run is measured the same way (:mod:`.measure`) and one Markdown table, one
JSON and one PNG are written (:mod:`.report`). A finished run is reused and an
interrupted one resumed (:mod:`.run`); a preset that fails is reported with its error
and does not stop the others. What is trained, and with what, is :mod:`.plan`.
"""

from .measure import measure_run
from .plan import DEFAULT_PRESETS, Settings, parse_presets, plan
from .report import markdown_table, write_report
from .run import run_comparison

__all__ = [
    "DEFAULT_PRESETS",
    "Settings",
    "markdown_table",
    "measure_run",
    "parse_presets",
    "plan",
    "run_comparison",
    "write_report",
]
