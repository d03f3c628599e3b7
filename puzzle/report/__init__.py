"""The run report: report.md and pareto.png."""
