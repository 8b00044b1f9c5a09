"""The VLM's own worker: NG defects in, exactly one description message per defect out.

The daemon calls :meth:`DescriptionWorker.submit` after it published a defect; ``submit``
never blocks (it crops the frame around the regions, a copy, and queues it). One thread
runs the VLM, so verdicts are never delayed by it; its ORT threads run at a lower CPU
priority (``nice``) so that, on a small edge CPU, the region expert keeps its cores.

Backlog (bounded, ``backlog`` jobs) when the line outruns the VLM:

* ``"newest_first"``: the worker always takes the newest pending defect (a fresh
  description is worth more than a stale one); when full, the *oldest* pending defect
  is dropped.
* ``"skip"``: first in, first out; when full, the *new* defect is dropped.

A dropped defect still gets its one description message, ``status: "skipped"``,
``reason: "backlog_full"``, so subscribers can count on one per defect. Counters:
submitted, described, skipped_backlog, skipped_shutdown, errors, published.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from linecam import messages
from linecam.runtime.postprocess import Region
from linecam.runtime.vlm.prompt import GroundedPrompt, RegionPromptBuilder

logger = logging.getLogger(__name__)

BacklogPolicy = Literal["newest_first", "skip"]


class Describer(Protocol):
    """What the worker needs from a VLM (:class:`linecam.runtime.vlm.engine.VlmEngine` is one)."""

    def generate(self, image: np.ndarray | None, prompt: str, *, max_new_tokens: int = ...,
                 on_token: Callable[[int, str], None] | None = ...,
                 should_stop: Callable[[], bool] | None = ...) -> Any: ...


@dataclass(slots=True)
class _Job:
    grounded: GroundedPrompt
    defect_event_id: str
    verdict_event_id: str | None
    frame_id: int
    submitted_ns: int
    features: np.ndarray | None = None  # region-token features (a bundle with a projector)


class DescriptionWorker:
    """Describe defects with a VLM in one background thread; publish one message per defect.

    ``engine``: a :class:`Describer`, or a zero-argument factory returning one; a factory
    is called inside the worker thread *after* it lowered its priority, so the VLM's
    ONNX Runtime threads inherit the lower priority (preferred on the line).
    ``publish(msg)`` gets each description message (a :func:`linecam.messages.description`
    dict); the daemon sends it to ``topics.description`` with QoS 1. It is called from the
    worker thread, and from :meth:`submit`'s caller for backlog drops.
    """

    def __init__(self, engine: Describer | Callable[[], Describer], publish: Callable[[dict[str, Any]], None], *,
                 line: str, camera: str, prompt_builder: RegionPromptBuilder | None = None, backlog: int = 4,
                 policy: BacklogPolicy = "newest_first", max_new_tokens: int = 64,
                 model_info: Mapping[str, Any] | None = None, include_prompt: bool = True, nice: int = 10,
                 on_token: Callable[[str, int, str], None] | None = None,
                 projector: Any | Callable[[], Any] | None = None) -> None:
        if backlog < 1:
            raise ValueError("backlog must be >= 1")
        if policy not in ("newest_first", "skip"):
            raise ValueError(f"backlog policy {policy!r}: use 'newest_first' or 'skip'")
        self._engine_or_factory = engine
        self._engine: Describer | None = None
        self._publish = publish
        self.line, self.camera = line, camera
        self.builder = prompt_builder or RegionPromptBuilder()
        self.backlog = backlog
        self.policy = policy
        self.max_new_tokens = max_new_tokens
        self.model_info = dict(model_info) if model_info is not None else None
        self.include_prompt = include_prompt
        self.nice = nice
        self.on_token = on_token
        #: Region-token injection: a RegionProjector (or a factory called in the worker thread).
        self._projector_or_factory = projector
        self._projector: Any | None = None
        self._pending: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._counts = {k: 0 for k in ("submitted", "described", "skipped_backlog", "skipped_shutdown", "errors",
                                       "published")}
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # -- public API ---------------------------------------------------------------------------
    def start(self, wait_ready: bool = True, timeout: float | None = 120.0) -> DescriptionWorker:
        """Start the thread; with ``wait_ready``, return once the engine is loaded (raising its error)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="vlm-descriptions", daemon=True)
        self._thread.start()
        if wait_ready:
            self._ready.wait(timeout)
            if self._start_error is not None:
                raise self._start_error
        return self

    def submit(self, image: np.ndarray, regions: Sequence[Region | Mapping[str, Any]], defect_event_id: str, *,
               frame_id: int, verdict_event_id: str | None = None, threshold: float = 1.0,
               bit_depth: int = 8, anomaly_map: np.ndarray | None = None, geometry: Any = None) -> bool:
        """Queue one defect for description; never blocks on the VLM.

        ``image``: the frame's image (linecam layout); ``regions``: the NG frame's
        :class:`Region` list (raw scores, normalised with ``threshold`` = the image
        threshold) or the defect message's region dicts; ``defect_event_id``: the
        ``event_id`` of the published defect message. Returns False when this defect was
        dropped by the backlog policy (its ``skipped`` description is already published).
        ``anomaly_map`` / ``geometry`` (the inspection's): the map crop of the region tokens.
        """
        now = time.monotonic_ns()
        try:
            grounded = self.builder.build(image, regions, threshold=threshold, bit_depth=bit_depth)
            features = None
            if self._projector_or_factory is not None:
                from linecam.runtime.vlm.region_tokens import map_crop, region_features

                crop = None
                if anomaly_map is not None and geometry is not None and grounded.regions:
                    top = max(grounded.regions, key=lambda r: r["score"])
                    crop = map_crop(anomaly_map, top["bbox"], geometry)
                features = region_features(grounded.regions, (image.shape[1], image.shape[0]), crop)
        except Exception as e:  # a bad frame must not break the caller (the daemon's defect path)
            logger.exception("defect %s (frame %d): prompt not built", defect_event_id, frame_id)
            with self._cond:
                self._counts["submitted"] += 1
                self._counts["errors"] += 1
            self._emit(messages.description(
                line=self.line, camera=self.camera, frame_id=int(frame_id), defect_event_id=defect_event_id,
                verdict_event_id=verdict_event_id, status="error", text=None,
                reason=f"prompt_error: {type(e).__name__}", n_regions=len(regions), model=self.model_info))
            return False
        job = _Job(grounded, defect_event_id, verdict_event_id, int(frame_id), now, features)
        dropped: _Job | None = None
        accepted = True
        with self._cond:
            self._counts["submitted"] += 1
            if self._stopping:
                dropped, accepted, reason = job, False, "shutdown"
            elif len(self._pending) >= self.backlog:
                reason = "backlog_full"
                if self.policy == "newest_first":
                    dropped = self._pending.popleft()
                    self._pending.append(job)
                else:
                    dropped, accepted = job, False
            else:
                self._pending.append(job)
            if dropped is not None:
                self._counts["skipped_backlog" if reason == "backlog_full" else "skipped_shutdown"] += 1
            self._cond.notify()
        if dropped is not None:
            self._emit_skipped(dropped, reason)
        return accepted

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread. ``drain``: describe what is pending first; else those get ``skipped``
        (reason ``shutdown``) and a running generation is cancelled (published as is)."""
        with self._cond:
            self._stopping = True
            dropped: list[_Job] = []
            if not drain:
                dropped = list(self._pending)
                self._pending.clear()
                self._cancel.set()
                self._counts["skipped_shutdown"] += len(dropped)
            self._cond.notify_all()
        for job in dropped:
            self._emit_skipped(job, "shutdown")
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running (tests, orderly drains)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def counters(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counts)

    @property
    def backlog_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- internals ----------------------------------------------------------------------------
    def _emit(self, msg: dict[str, Any]) -> None:
        try:
            self._publish(msg)
            with self._cond:
                self._counts["published"] += 1
        except Exception:  # a broken publisher must not kill the worker
            logger.exception("description for defect %s not published", msg.get("defect_event_id"))

    def _emit_skipped(self, job: _Job, reason: str) -> None:
        self._emit(messages.description(
            line=self.line, camera=self.camera, frame_id=job.frame_id, defect_event_id=job.defect_event_id,
            verdict_event_id=job.verdict_event_id, status="skipped", text=None, reason=reason,
            n_regions=len(job.grounded.regions), prompt=job.grounded.prompt if self.include_prompt else None,
            latency_ms={"total": (time.monotonic_ns() - job.submitted_ns) / 1e6}, model=self.model_info))

    def _lower_priority(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            try:  # Linux: a thread is a task with its own nice value; its children inherit it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError as e:
                logger.debug("could not lower the VLM thread's priority: %s", e)

    def _run(self) -> None:
        self._lower_priority()
        try:
            eng = self._engine_or_factory
            self._engine = eng if hasattr(eng, "generate") else eng()  # type: ignore[operator]
            proj = self._projector_or_factory
            self._projector = proj() if callable(proj) and not hasattr(proj, "inject") else proj
        except BaseException as e:  # reported by start(); every later submit is published as error
            self._start_error = e
            logger.error("VLM could not be loaded: %s", e)
        finally:
            self._ready.set()
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                job = self._pending.pop() if self.policy == "newest_first" else self._pending.popleft()
                self._busy = True
            try:
                self._describe(job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _describe(self, job: _Job) -> None:
        t_start = time.monotonic_ns()
        common = dict(line=self.line, camera=self.camera, frame_id=job.frame_id,
                      defect_event_id=job.defect_event_id, verdict_event_id=job.verdict_event_id,
                      n_regions=len(job.grounded.regions),
                      prompt=job.grounded.prompt if self.include_prompt else None, model=self.model_info)
        if self._engine is None:
            with self._cond:
                self._counts["errors"] += 1
            self._emit(messages.description(**common, status="error", text=None, reason="vlm_not_loaded",
                                            latency_ms={"total": (time.monotonic_ns() - job.submitted_ns) / 1e6}))
            return
        on_tok: Callable[[int, str], None] | None = None
        if self.on_token is not None:
            cb, eid = self.on_token, job.defect_event_id
            on_tok = lambda tok, piece: cb(eid, tok, piece)  # noqa: E731  (tags the stream with its defect)
        inject_ms = None
        try:
            if self._projector is not None and job.features is not None:
                t_enc = time.perf_counter()
                enc = self._engine.encode(job.grounded.image, job.grounded.prompt)  # type: ignore[attr-defined]
                t_inj = time.perf_counter()
                enc = self._projector.inject(enc, job.features)  # projector run + K placeholder slots
                inject_ms = (time.perf_counter() - t_inj) * 1e3
                gen = self._engine.generate_encoded(  # type: ignore[attr-defined]
                    enc, max_new_tokens=self.max_new_tokens, on_token=on_tok, should_stop=self._cancel.is_set,
                    t_start=t_enc)
            else:
                gen = self._engine.generate(job.grounded.image, job.grounded.prompt,
                                            max_new_tokens=self.max_new_tokens, on_token=on_tok,
                                            should_stop=self._cancel.is_set)
        except Exception as e:
            logger.exception("VLM failed on defect %s (frame %d)", job.defect_event_id, job.frame_id)
            with self._cond:
                self._counts["errors"] += 1
            self._emit(messages.description(**common, status="error", text=None,
                                            reason=f"vlm_error: {type(e).__name__}",
                                            latency_ms={"total": (time.monotonic_ns() - job.submitted_ns) / 1e6}))
            return
        timings = dict(getattr(gen, "timings_ms", {}) or {})
        lat = {"queue": (t_start - job.submitted_ns) / 1e6}
        lat.update({k: v for k, v in timings.items() if k in ("vision", "prefill", "ttft", "decode")})
        if inject_ms is not None:
            lat["inject"] = inject_ms
        lat["total"] = (time.monotonic_ns() - job.submitted_ns) / 1e6
        with self._cond:
            self._counts["described"] += 1
        self._emit(messages.description(**common, status="ok", text=gen.text, n_tokens=len(gen.tokens),
                                        stop_reason=gen.stop_reason, latency_ms=lat))
