"""GenICam line-scan configuration: the node writes a :class:`linecam.config.GenICamLineScan`
section asks for (``AcquisitionLineRate`` / ``AcquisitionLineRateAbs``,
``TriggerSelector=LineStart`` with a line or encoder source, ``Encoder*``).

Every node it needs is checked first and one error names all that the camera lacks.
Pass ``linescan_setup(settings)`` as ``GenICamSource(setup=...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from linecam.config import GenICamLineScan
from linecam.errors import CameraError

logger = logging.getLogger(__name__)


def plan_linescan(settings: GenICamLineScan, has_node: Callable[[str], bool]) -> tuple[list[tuple[str, object]], list[str]]:
    """The node writes, in order, for a camera with the nodes ``has_node`` says it has,
    and the nodes (or alternatives, "A or B") it lacks. A value ``None`` executes a command node."""
    writes: list[tuple[str, object]] = []
    missing: list[str] = []

    def need(name: str, value: object) -> None:
        if has_node(name):
            writes.append((name, value))
        else:
            missing.append(name)

    def either(names: Sequence[str], value: object) -> None:
        for n in names:
            if has_node(n):
                writes.append((n, value))
                return
        missing.append(" or ".join(names))

    if settings.trigger == "free_run":
        # Line triggers off, so that the camera's own line rate applies (no node: free-running already).
        if has_node("TriggerSelector") and has_node("TriggerMode"):
            writes += [("TriggerSelector", "LineStart"), ("TriggerMode", "Off")]
        if settings.line_rate_hz is not None:
            if has_node("AcquisitionLineRateEnable"):
                writes.append(("AcquisitionLineRateEnable", True))
            either(("AcquisitionLineRate", "AcquisitionLineRateAbs"), float(settings.line_rate_hz))
    if settings.encoder is not None:
        e = settings.encoder
        need("EncoderSelector", e.selector)
        need("EncoderSourceA", e.source_a)
        if e.source_b is not None:
            need("EncoderSourceB", e.source_b)
        if e.mode is not None:
            need("EncoderMode", e.mode)
        if e.divider is not None:
            need("EncoderDivider", int(e.divider))
        if e.output_mode is not None:
            need("EncoderOutputMode", e.output_mode)
        if e.reset:
            need("EncoderReset", None)
    if settings.trigger != "free_run":
        source = settings.trigger_source or ("Encoder0" if settings.trigger == "encoder" else "Line1")
        need("TriggerSelector", "LineStart")
        need("TriggerMode", "On")
        need("TriggerSource", source)
        if settings.trigger_activation is not None and settings.trigger != "encoder":
            need("TriggerActivation", settings.trigger_activation)
    return writes, missing


def apply_linescan(settings: GenICamLineScan, node_map: Any, set_node: Callable[[str, object], None]) -> dict[str, object]:
    """Write the plan to ``node_map`` with ``set_node(name, value)`` (GenICamSource's
    checked setter). Raises :class:`CameraError` naming every node the camera lacks before
    writing anything. Returns what the camera reports back (e.g. ``ResultingLineRate``)."""
    writes, missing = plan_linescan(settings, node_map.has_node)
    if missing:
        model = _value(node_map, "DeviceModelName") or "camera"
        raise CameraError(
            f"{model} lacks the line-scan feature(s) {', '.join(missing)} needed for "
            f"camera.linescan (trigger {settings.trigger}): is it a line-scan camera? check its manual for "
            "the names and set them under camera.features instead"
        )
    if settings.trigger == "free_run" and "LineStart" not in (_symbolics(node_map, "TriggerSelector") or ()):
        # An area-scan style trigger only (FrameStart ...): no line trigger to switch off.
        writes = [w for w in writes if w[0] not in ("TriggerSelector", "TriggerMode")]
    for name, value in writes:
        set_node(name, value)
    readback = {}
    for name in ("Height", "ResultingLineRate", "ResultingLineRateAbs", "AcquisitionLineRate",
                 "AcquisitionLineRateAbs", "TriggerSource", "EncoderValue"):
        v = _value(node_map, name)
        if v is not None:
            readback[name] = v
    logger.info("line-scan settings applied (%s): %s", settings.trigger, readback)
    return readback


def linescan_setup(settings: GenICamLineScan) -> Callable[[Any, Callable[[str, object], None]], dict[str, object]]:
    """``GenICamSource(setup=...)`` for ``settings``."""
    return lambda node_map, set_node: apply_linescan(settings, node_map, set_node)


def _value(node_map: Any, name: str) -> object:
    try:
        return node_map.get_node(name).value if node_map.has_node(name) else None
    except Exception:  # for messages and logs only
        return None


def _symbolics(node_map: Any, name: str) -> tuple[str, ...] | None:
    """The values an enumeration node offers (None: no such node, or not an enumeration)."""
    try:
        if not node_map.has_node(name):
            return None
        values = getattr(node_map.get_node(name), "symbolics", None)
        return None if values is None else tuple(str(v) for v in values)
    except Exception:  # a node we cannot inspect: treat as absent
        return None
