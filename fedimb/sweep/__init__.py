"""Sweeps: a grid of config overrides, one run per cell, then a report.

A sweep file is a small TOML file::

    base = "quickstart.toml"          # a run config, relative to this file
    name = "compare-losses"           # output folder results/<name> by default
    target-error = 0.3                # optional: report "rounds to reach target"
    [set]                             # optional: fixed overrides for every cell
    engine = "inprocess"
    [methods]                         # optional: named sets of keys, one axis
    ERM = { "loss.name" = "ce" }
    RS = { "loss.name" = "ce", "sampling.name" = "class-balanced" }
    [grid]                            # cartesian product over dotted config keys
    "loss.name" = ["ce", "focal"]
    seed = [0, 1, 2]
    [[exclude]]                       # optional: drop the cells that match every key
    "loss.name" = "focal"             # (a list matches any of its values)
    seed = [1, 2]

A method is what a paper's table row names (a loss with a sampler, a loss with its
head): several keys that vary together. Methods form the first axis; the report groups
by method (its label) and the grid keys. A calibration adds the published errors, which
the report shows beside its own (``balanced`` and any class name, as fractions)::

    [reference]
    source = "Cao et al. 2019, Table 1"
    ERM = { balanced = 0.3682, neg = 0.7078, pos = 0.0286 }

Each cell writes its own results folder ``<out_dir>/<cell name>/``; a completed cell is
skipped on the next call, so an interrupted sweep resumes where it stopped. ``only``
runs some cells (the rest stay listed, so the report shows what is still missing), and
several sweeps may work in one folder at once: each cell is claimed by the process that
runs it, and a cell claimed elsewhere is left to that process.

Modules: :mod:`.spec` (the file and its cells), :mod:`.runner` (running, resume, the
report), :mod:`.executors` with :mod:`.processes` (``--jobs``) and :mod:`.ray_cells`
(``--ray``), :mod:`.command` (``fedimb sweep``). Importing this package imports neither
torch, Flower nor Ray.
"""

from fedimb.sweep.runner import TRACEBACK_FILE, CellResult, run_sweep
from fedimb.sweep.spec import (
    DEFAULT_RESULTS_ROOT,
    SWEEP_KEYS,
    Cell,
    Selector,
    Sweep,
    check_selector,
    default_out_dir,
    expand,
    load_sweep,
    matches,
    parse_only,
)

__all__ = [
    "DEFAULT_RESULTS_ROOT",
    "SWEEP_KEYS",
    "TRACEBACK_FILE",
    "Cell",
    "CellResult",
    "Selector",
    "Sweep",
    "check_selector",
    "default_out_dir",
    "expand",
    "load_sweep",
    "matches",
    "parse_only",
    "run_sweep",
]
