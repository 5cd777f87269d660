"""The whole method end to end on a synthetic set, on a CPU, in minutes (`clasp demo`).

run.py     the stages and `run_demo`, each stage a call of the function its own command
           calls (`generate`, `fit`, `label_folder`, `train`, the eval protocols)
report.py  the results table, the markdown report, summary.json and the pictures
cli.py     the `clasp demo` command
"""
