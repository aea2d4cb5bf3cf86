"""The aggregation and report job: metrics, thresholds, predictions, exports, plots, HTML.

Everything is computed from the SQL database, so it reads the same whether one process or a
hundred workers wrote the scores. Entry points: `aggregator.aggregate.aggregate_run` and
`aggregator.report.write_report`.
"""
