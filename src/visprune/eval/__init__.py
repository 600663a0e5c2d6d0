"""Accuracy evaluation of the reduction methods (`visprune eval`): the synthetic suite on any supported
checkpoint, resumable, with Markdown / JSON / plot reports."""

from visprune.eval.report import markdown, plot, write_reports
from visprune.eval.synth import BUDGETS, EvalConfig, budget_options, evaluate, plan_cells

__all__ = ["BUDGETS", "EvalConfig", "budget_options", "evaluate", "markdown", "plan_cells", "plot", "write_reports"]
