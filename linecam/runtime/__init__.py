"""The daemon's runtime: post-processing of anomaly maps, annotated snapshots,
latency statistics, systemd notification and the acquisition/inference loop.

Kept free of imports here so that ``import linecam.runtime.sdnotify`` (for
example) stays cheap; import the submodule you need.
"""
