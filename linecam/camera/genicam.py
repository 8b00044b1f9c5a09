"""GenICam cameras (GigE Vision, USB3 Vision, CoaXPress ...) through harvesters + a GenTL producer.

harvesters is imported inside :meth:`GenICamSource.open` only, so the rest of
linecam works without the ``genicam`` extra. Known harvesters 1.4.3 pitfalls this
module works around (see shared/notes/genicam.md):

* ``fetch(timeout=0)`` waits forever: we always pass a positive timeout;
* ``fetch`` may return ``None`` (buffer info unavailable), so no ``with ia.fetch()``
  directly;
* harvesters does not strip row padding and unpacks packed formats including the
  padding bytes: we convert the component's raw bytes ourselves (``pixels``);
* ``Harvester.update()`` destroys live acquirers: it is called in :meth:`open` only;
* ``stop()`` / ``destroy()`` can raise on a dead link: each is guarded in ``close``;
* on a torn-down acquirer harvesters raises GenTL exceptions, but also plain Python
  ones (``AttributeError`` on a released handle): :meth:`read` turns every one into a
  :class:`CameraError`, which the daemon answers by ``close()`` + ``open()`` with back-off.

Frame ids continue across a reopen (the camera restarts its own count), so a daemon's
verdicts keep one id per frame through a reconnect. A buffer that arrives but cannot be
converted (a pixel format changed under us, a short buffer) comes back as a frame with an
empty image and ``meta["invalid"]`` saying why: the daemon skips it with a verdict.

Creating an ImageAcquirer in the main thread installs harvesters' own SIGINT handler
(it destroys the acquirer); :meth:`open` puts the previous handler back, so a daemon's
Ctrl-C handling survives every reopen after a camera fault.

:class:`CameraUnavailable` (a :class:`CameraError` with ``transient = True``) means the
camera is not there *now* (not found, busy, failed to start): it may appear later, so a
daemon retries instead of exiting. Other CameraErrors (no .cti, a setting the camera
refuses) need someone to change something.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from linecam.camera.base import FrameSource
from linecam.camera.frame import Frame
from linecam.camera.pixels import SUPPORTED_FORMATS, raw_size, to_frame_image
from linecam.errors import CameraError

logger = logging.getLogger(__name__)

_INSTALL_HINT = "GenICam support needs harvesters: pip install 'linecam[genicam]'"
_BUFFER_HANDLING_MODES = ("NewestOnly", "OldestFirst", "OldestFirstOverwrite")


class CameraUnavailable(CameraError):
    """The camera is absent, busy or failed to start right now; retrying may help."""

    transient = True


def viky_cti_path() -> Path:
    """Path of ``viky.cti``, the virtual-camera GenTL producer shipped in the ``genicam`` wheel."""
    try:
        import genicam
    except ImportError as e:
        raise CameraError(_INSTALL_HINT) from e
    return Path(genicam.__file__).resolve().parent / "viky.cti"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class GenICamSource(FrameSource):
    """Frames from one GenICam camera.

    The camera is chosen by ``serial``, else ``device_id``, else ``index``
    (default: the first camera the producer reports). ``pixel_format``, ``width``,
    ``height`` and then ``features`` (GenICam node name -> value, in order) are
    written to the camera's node map before acquisition starts.
    ``buffer_handling`` sets the stream's ``StreamBufferHandlingMode`` where the
    producer has that node (``NewestOnly`` = always the latest frame, the right
    choice for live inspection).

    ``fetch_timeout`` caps one wait inside :meth:`read` (``read(timeout)`` waits
    ``min(timeout, fetch_timeout)``), so a caller passing a long timeout still
    gets control back regularly to notice a silent camera.

    ``setup``, when given, is called after those settings with the camera's node map and
    a checked setter ``set_node(name, value)`` (the one ``features`` use): camera-specific
    configuration such as :func:`linecam.camera.genicam_linescan.linescan_setup`.

    Attributes: ``dropped`` counts frames lost between two reads (gaps in the
    camera's frame ids), ``model`` is the camera model once open,
    ``last_frame_ns`` the host monotonic time of the last frame (None before one).
    """

    def __init__(
        self,
        cti: str | Path,
        serial: str | None = None,
        device_id: str | None = None,
        index: int | None = None,
        num_buffers: int = 8,
        buffer_handling: str = "NewestOnly",
        pixel_format: str | None = None,
        width: int | None = None,
        height: int | None = None,
        features: dict[str, object] | None = None,
        fetch_timeout: float = 2.0,
        setup: Callable[[Any, Callable[[str, object], None]], object] | None = None,
    ) -> None:
        self.cti = Path(cti)
        self.serial = None if serial is None else str(serial)
        self.device_id = device_id
        self.index = index
        self.num_buffers = int(num_buffers)
        self.buffer_handling = buffer_handling
        self.pixel_format = pixel_format
        self.width = width
        self.height = height
        self.features: dict[str, object] = dict(features or {})
        self.fetch_timeout = float(fetch_timeout)
        self.setup = setup
        if self.serial is not None:
            self.name = f"genicam:{self.serial}"
        elif device_id is not None:
            self.name = f"genicam:{device_id}"
        else:
            self.name = f"genicam:#{index or 0}"
        self.model = "?"
        self.dropped = 0
        self.last_frame_ns: int | None = None
        self._harvester: Any = None
        self._ia: Any = None
        self._gentl: Any = None
        self._genapi: Any = None
        self._last_frame_id: int | None = None
        self._has_device_timestamps = True
        self._sessions = 0  # successful opens
        self._id_offset = 0  # added to the camera's frame ids (continuity across reopens)
        self._next_id = 0  # one past the last frame id handed out
        self._need_offset = False
        self._gap = 0

    # --- open -----------------------------------------------------------------------

    def open(self) -> None:
        if self._ia is not None:
            return
        try:
            from genicam import genapi, gentl
            from harvesters.core import Harvester
        except ImportError as e:
            raise CameraError(_INSTALL_HINT) from e
        self._gentl, self._genapi = gentl, genapi

        if not self.cti.is_file():
            raise CameraError(
                f"GenTL producer {self.cti} not found: install the camera vendor's SDK "
                "or point 'cti' at its .cti file"
            )
        h = Harvester()
        self._harvester = h
        try:
            try:
                h.add_file(str(self.cti), check_existence=True, check_validity=True)
            except (OSError, FileNotFoundError) as e:
                raise CameraError(
                    f"GenTL producer {self.cti} cannot be loaded ({_one_line(e)}): "
                    "use the .cti built for this OS and CPU architecture"
                ) from e
            h.update()
            dev_index = self._pick_device(h.device_info_list)
            info = h.device_info_list[dev_index]
            self.model = str(getattr(info, "model", None) or "?")
            if self.serial is None:
                self.name = f"genicam:{getattr(info, 'serial_number', dev_index)}"
            main = threading.current_thread() is threading.main_thread()
            prev_sigint = signal.getsignal(signal.SIGINT) if main else None
            try:
                ia = h.create(dev_index)
            except gentl.GenericException as e:
                raise CameraUnavailable(
                    f"cannot open camera {self._describe(info)} ({_one_line(e)}): "
                    "is it open in another program (viewer, second linecam)?"
                ) from e
            finally:
                if main and prev_sigint is not None:
                    signal.signal(signal.SIGINT, prev_sigint)  # not harvesters' own (it destroys the acquirer)
            self._ia = ia
            self._configure(ia)
            ia.start()
        except CameraError:
            self.close()
            raise
        except (gentl.GenericException, genapi.GenericException) as e:
            self.close()
            raise CameraUnavailable(
                f"cannot start camera {self.name} ({self.model}): {_one_line(e)}; check cable/power"
            ) from e
        except BaseException:
            self.close()
            raise
        if self._sessions == 0:
            self.dropped = 0
        self._sessions += 1
        self._need_offset = self._sessions > 1  # the first frame of this session fixes the offset
        self._last_frame_id = None
        self.last_frame_ns = None
        self._has_device_timestamps = True
        logger.info(
            "opened %s (%s) %s %sx%s",
            self.name,
            self.model,
            self._node_value(ia.remote_device.node_map, "PixelFormat"),
            self._node_value(ia.remote_device.node_map, "Width"),
            self._node_value(ia.remote_device.node_map, "Height"),
        )

    @staticmethod
    def _describe(info: Any) -> str:
        return (
            f"{getattr(info, 'model', '?')} serial={getattr(info, 'serial_number', '?')} "
            f"id={getattr(info, 'id_', '?')}"
        )

    def _pick_device(self, infos: list[Any]) -> int:
        seen = "; ".join(f"[{i}] {self._describe(d)}" for i, d in enumerate(infos)) or "none"
        if not infos:
            raise CameraUnavailable(
                f"no camera found by GenTL producer {self.cti.name}: check cable, power and network "
                "settings, and that no other program holds the camera"
            )
        if self.serial is not None:
            for i, d in enumerate(infos):
                if str(getattr(d, "serial_number", None)) == self.serial:
                    return i
            raise CameraUnavailable(f"no camera with serial {self.serial!r}: cameras seen: {seen}")
        if self.device_id is not None:
            for i, d in enumerate(infos):
                if getattr(d, "id_", None) == self.device_id:
                    return i
            raise CameraUnavailable(f"no camera with device id {self.device_id!r}: cameras seen: {seen}")
        idx = 0 if self.index is None else int(self.index)
        if not 0 <= idx < len(infos):
            raise CameraUnavailable(f"no camera at index {idx}: cameras seen: {seen}")
        return idx

    def _configure(self, ia: Any) -> None:
        nm = ia.remote_device.node_map

        # The stream node map belongs to the producer, not the camera.
        if self.buffer_handling:
            if self.buffer_handling not in _BUFFER_HANDLING_MODES:
                raise CameraError(
                    f"buffer_handling {self.buffer_handling!r} is unknown: use one of "
                    + ", ".join(_BUFFER_HANDLING_MODES)
                )
            try:
                snm = ia.data_streams[0].node_map
                if snm.has_node("StreamBufferHandlingMode"):
                    snm.StreamBufferHandlingMode.value = self.buffer_handling
                else:
                    logger.info("%s: producer has no StreamBufferHandlingMode; using its default", self.name)
            except (self._genapi.GenericException, self._gentl.GenericException) as e:
                raise CameraError(
                    f"cannot set StreamBufferHandlingMode={self.buffer_handling} on {self.model}: "
                    f"{_one_line(e)}"
                ) from e

        if self.pixel_format is not None and self.pixel_format not in SUPPORTED_FORMATS:
            raise CameraError(
                f"pixel_format {self.pixel_format!r} is not supported by linecam: use one of "
                + ", ".join(SUPPORTED_FORMATS)
            )
        settings: list[tuple[str, object]] = []
        if self.pixel_format is not None:
            settings.append(("PixelFormat", self.pixel_format))
        if self.width is not None:
            settings.append(("Width", int(self.width)))
        if self.height is not None:
            settings.append(("Height", int(self.height)))
        settings.extend(self.features.items())
        for name, value in settings:
            self._set_node(nm, name, value)
        if self.setup is not None:
            self.setup(nm, lambda name, value: self._set_node(nm, name, value))

        # Fail at open, not at the first frame, when the camera sends something we cannot convert.
        current = self._node_value(nm, "PixelFormat")
        if current is not None and str(current) not in SUPPORTED_FORMATS:
            raise CameraError(
                f"camera {self.model} is set to PixelFormat {current}, which linecam cannot convert: "
                "set pixel_format to one of " + ", ".join(SUPPORTED_FORMATS)
            )

        if self.num_buffers < ia.min_num_buffers:
            raise CameraError(
                f"num_buffers={self.num_buffers} is below the producer's minimum {ia.min_num_buffers}: raise it"
            )
        ia.num_buffers = self.num_buffers

    def _set_node(self, nm: Any, name: str, value: object) -> None:
        if not nm.has_node(name):
            raise CameraError(
                f"camera {self.model} has no feature {name!r}: remove it from the camera settings "
                "or check the camera manual for its name"
            )
        node = nm.get_node(name)
        try:
            if value is None and hasattr(node, "execute"):
                node.execute()  # a command node, e.g. TriggerSoftware / EncoderReset
                return
            symbolics = getattr(node, "symbolics", None)
            if symbolics is not None and str(value) not in symbolics:
                raise CameraError(
                    f"camera {self.model} does not accept {name}={value!r}: it offers "
                    + ", ".join(symbolics)
                )
            node.value = value
        except CameraError:
            raise
        except (self._genapi.GenericException, self._gentl.GenericException, TypeError, ValueError) as e:
            raise CameraError(f"cannot set {name}={value!r} on camera {self.model}: {_one_line(e)}") from e

    @staticmethod
    def _node_value(nm: Any, name: str) -> object:
        try:
            return nm.get_node(name).value if nm.has_node(name) else None
        except Exception:  # only used for a log line
            return None

    # --- read -----------------------------------------------------------------------

    def read(self, timeout: float) -> Frame | None:
        ia = self._ia
        if ia is None:
            raise CameraError(f"{self.name} is not open: call open() first")
        gentl = self._gentl
        # harvesters treats timeout=0 as "wait forever"
        timeout = max(min(float(timeout), self.fetch_timeout), 1e-3)
        try:
            buf = ia.fetch(timeout=timeout)
            if buf is None:  # harvesters discarded a buffer it could not describe
                return None
            with buf:
                host_ns = time.monotonic_ns()
                return self._to_frame(buf, host_ns)
        except gentl.TimeoutException:
            return None
        except CameraError:
            raise
        except Exception as e:  # GenTL / GenApi errors, and whatever a torn-down acquirer raises
            raise CameraError(
                f"camera {self.name} ({self.model}) stopped delivering: {_one_line(e)}; check cable/power"
            ) from e

    def _to_frame(self, buf: Any, host_ns: int) -> Frame | None:
        components = buf.payload.components if buf.payload is not None else []
        if not components:
            logger.warning("%s: buffer without an image component skipped", self.name)
            return None
        comp = components[0]
        fmt = str(comp.data_format)
        w, h = int(comp.width), int(comp.height)
        pad = int(comp.x_padding)
        frame_id = self._frame_id(int(buf.module.frame_id))
        self.last_frame_ns = host_ns
        try:
            try:
                # The raw bytes, not comp.data: harvesters expands packed formats
                # including row padding and never strips the padding.
                count = raw_size(w, h, fmt, pad)
                data = np.frombuffer(buf.module.raw_buffer, dtype=np.uint8, count=count, offset=comp.data_offset)
            except (ValueError, TypeError, AttributeError):
                data = comp.data
            # copies: the buffer is re-queued when the caller's `with` block exits
            image, bit_depth = to_frame_image(data, w, h, fmt, pad)
        except CameraError as e:
            # The link works, this one buffer does not convert: one skipped frame, not a reconnect.
            return Frame(frame_id=frame_id, image=np.empty((0, 0, 1), np.uint8), timestamp_ns=host_ns,
                         clock="host_monotonic", host_ns=host_ns, meta={"pixel_format": fmt, "invalid": str(e)})

        ts, clock = self._timestamp(buf)
        if ts is None:
            ts, clock = host_ns, "host_monotonic"
        return Frame(
            frame_id=frame_id,
            image=image,
            timestamp_ns=ts,
            clock=clock,
            host_ns=host_ns,
            bit_depth=bit_depth,
            meta={"pixel_format": fmt, "dropped_before": self._gap},
        )

    def _frame_id(self, raw: int) -> int:
        """The camera's id, offset so ids keep increasing across reopens; counts gaps (drops)."""
        if self._need_offset:
            self._id_offset = self._next_id - raw
            self._need_offset = False
        last = self._last_frame_id
        self._gap = 0
        if last is not None and raw > last + 1:
            self._gap = raw - last - 1
            self.dropped += self._gap
        self._last_frame_id = raw
        out = raw + self._id_offset
        self._next_id = out + 1
        return out

    def _timestamp(self, buf: Any) -> tuple[int | None, str]:
        # Producers without timestamps (viky) raise on every call: stop asking.
        if not self._has_device_timestamps:
            return None, "host_monotonic"
        try:
            ts = int(buf.timestamp_ns)
        except (self._gentl.GenericException, AttributeError, TypeError):
            ts = 0
        if ts <= 0:
            self._has_device_timestamps = False
            logger.info("%s: no device timestamps; using host monotonic time", self.name)
            return None, "host_monotonic"
        return ts, "device"

    # --- close ----------------------------------------------------------------------

    def close(self) -> None:
        ia, h = self._ia, self._harvester
        self._ia = None
        self._harvester = None
        if ia is not None:
            # On a dead link either call can raise (AccessDenied / Busy): do both regardless.
            try:
                ia.stop()
            except Exception as e:
                logger.warning("%s: stop failed: %s", self.name, _one_line(e))
            try:
                ia.destroy()
            except Exception as e:
                logger.warning("%s: destroy failed: %s", self.name, _one_line(e))
        if h is not None:
            try:
                h.reset()
            except Exception as e:
                logger.warning("%s: harvester reset failed: %s", self.name, _one_line(e))
