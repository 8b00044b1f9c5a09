"""The daemon's runtime: three stages and what they use (see ARCHITECTURE.md).

* acquisition (``acquisition``, ``framecheck``, ``sources``, line-scan adapter ``linescan``);
* inspection (``inspector``: preprocess -> ``backends`` runner -> ``postprocess``; ONNX Runtime
  sessions from ``session``);
* output (``outbox``, ``snapshots``, ``metrics``, ``publisher`` -> ``forwarder`` -> ``spool``);
* wiring and lifecycle (``daemon``, ``service``), plus ``stats``, ``sdnotify``, ``device``, ``vlm``;
* ``prometheus``: ``/metrics`` and the ``…/snapshot`` JPEGs, attached by ``service`` when configured.

Kept free of imports here so that ``import linecam.runtime.sdnotify`` (for
example) stays cheap; import the submodule you need.
"""
