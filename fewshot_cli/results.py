"""The report commands' functions, by the module each now lives in (fewshot_cli/reports/): kept so that
`from fewshot_cli.results import ...` goes on working."""

from fewshot_cli.reports.environment import environment, render_presets
from fewshot_cli.reports.memory import memreport, render_memreport
from fewshot_cli.reports.plots import plot_memory, plot_memory_runs, plot_table
from fewshot_cli.reports.runs import load_run, log_figures
from fewshot_cli.reports.tables import build_table, demo_table, render_table, summary_table

__all__ = ["build_table", "demo_table", "environment", "load_run", "log_figures", "memreport", "plot_memory",
           "plot_memory_runs", "plot_table", "render_memreport", "render_presets", "render_table", "summary_table"]
