"""`make bench`: the performance harness (bench.pipeline, report_scale.py) and its results."""
