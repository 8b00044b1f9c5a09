"""Latency benchmarks a plant engineer can trust (``linecam bench``; results in ``benchmarks/results/``).

Modes (one run, one broker, one bundle; ratios come from numbers of that one run):

* ``model``    — the backend alone: ``session.run`` on a preprocessed input (the
  ceiling, per ONNX Runtime setting) and the bare preprocess → run → postprocess path;
* ``naive``    — the loop a user writes first: read → preprocess → run → publish;
* ``pipeline`` — the daemon (:func:`linecam.runtime.service.run_service`) in-process on
  the replay source, across offered rates and unpaced;
* ``e2e``      — the daemon at 80 % of the ceiling, verdicts timed by a separate
  subscriber process through a real mosquitto (one host, one monotonic clock);
* ``vlm``      — marked unavailable until the compact VLM exists.

Modules: :mod:`.machine` (what it ran on), :mod:`.resources` (CPU / memory sampling),
:mod:`.workload` (frames, sessions), :mod:`.model`, :mod:`.naive`, :mod:`.pipeline`,
:mod:`.subscriber`, :mod:`.vlm`, :mod:`.suite` (the run), :mod:`.schema`,
:mod:`.report` (JSON / Markdown / README block), :mod:`.plots`, :mod:`.readme`, :mod:`.cli`.
"""
