"""Bad input never crashes or misleads: property-based tests of the config and bundle
loaders (only ConfigError / BundleError, one line, never a traceback), and the daemon's
answer to frames it must not judge, NaN model output, and a broker that refuses us."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundles import make_tiny_bundle, read_manifest
from linecam import schemas
from linecam.bundle import load_bundle
from linecam.camera.base import FrameSource
from linecam.camera.frame import Frame
from linecam.camera.synthetic import SyntheticLineSource
from linecam.config import LinecamConfig, load_config, parse_config
from linecam.errors import BundleError, ConfigError
from linecam.runtime.backends.base import ExpertOutput, Runner
from linecam.runtime.service import run_service
from helpers import collect, line_config

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

GOOD_CONFIG = {
    "line": "l1", "camera_id": "c1",
    "camera": {"kind": "synthetic", "fps": 30, "defect_rate": 0.1},
    "model": {"bundle": "bundles/expert", "intra_op_threads": 1},
    "mqtt": {"host": "10.0.0.5", "port": 1884, "username": "u", "password_env": "PW", "tls": True,
             "ca_file": "ca.pem"},
    "runtime": {"queue_size": 4, "reconnect_delay_s": [1, 5], "frame_size": [640, 480]},
    "output": {"snapshots_max_files": 5},
    "spool": {"max_rows": 1000, "sync": "full"},
}

# Any YAML/JSON-ish value.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)


def paths_of(tree, prefix=()):
    """Every key path inside a nested dict/list."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, base: dict):
    """``base`` with a few keys replaced, deleted or added (wrong types, unknown keys...)."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        all_paths = [p for p in paths_of(tree) if p]
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return tree


def assert_one_line(err: Exception) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


# -- config loader --------------------------------------------------------------------------------
def _load_text(tmp_path: Path, text: str | bytes) -> None:
    p = tmp_path / "line.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(p)
    except ConfigError as e:
        assert_one_line(e)
        assert e.exit_code == 2
    else:
        assert isinstance(cfg, LinecamConfig)


@FAST
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_config_loader_arbitrary_text(tmp_path, text):
    _load_text(tmp_path, text)


@FAST
@given(cfg=mutated(GOOD_CONFIG))
def test_config_loader_mutated_configs(tmp_path, cfg):
    _load_text(tmp_path, yaml.safe_dump(cfg, allow_unicode=True))


@FAST
@given(doc=values)
def test_config_loader_any_yaml_document(tmp_path, doc):
    _load_text(tmp_path, yaml.safe_dump(doc, allow_unicode=True))


@pytest.mark.parametrize("text", [
    "a: &x [*x]\n",                                  # a recursive alias
    "[" * 5000 + "]" * 5000,                        # nesting deeper than the parser's stack
    "camera: !!python/object/apply:os.system ['true']\n",  # no code execution: a clear error
    "\ufeffline: l1\n",                              # a BOM
    "camera:\n\tkind: synthetic\n",                   # tabs
], ids=["recursive-alias", "deep", "python-tag", "bom", "tabs"])
def test_config_loader_nasty_yaml(tmp_path, text):
    _load_text(tmp_path, text)


def test_config_is_a_directory_or_unreadable(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert_one_line(e.value)


def test_the_good_config_is_good(tmp_path):
    cfg = parse_config(copy.deepcopy(GOOD_CONFIG), tmp_path / "x.yaml")
    assert cfg.runtime.frame_size == (640, 480) and cfg.spool.sync == "full"


# -- bundle loader --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("good") / "b")


def _load_manifest(root: Path, data: bytes) -> None:
    (root / "manifest.json").write_bytes(data)
    try:
        load_bundle(root)
    except BundleError as e:
        assert_one_line(e)
        assert e.exit_code == 3


@pytest.fixture
def scratch_bundle(good_bundle, tmp_path):
    root = tmp_path / "b"
    if not root.exists():
        shutil.copytree(good_bundle, root)
    return root


@FAST
@given(manifest=st.deferred(lambda: mutated(_GOOD_MANIFEST)))
def test_bundle_loader_mutated_manifests(scratch_bundle, manifest):
    _load_manifest(scratch_bundle, json.dumps(manifest, allow_nan=True).encode())


@FAST
@given(data=st.one_of(st.binary(max_size=400), values.map(lambda v: json.dumps(v).encode())))
def test_bundle_loader_arbitrary_manifest_bytes(scratch_bundle, data):
    _load_manifest(scratch_bundle, data)


@pytest.mark.parametrize("data", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than json's recursion limit
    b'{"schema_version": 1e999}',
    b'{"schema_version": true}',
    b"\xff\xfe{}",
], ids=["deep", "huge-float", "bool-version", "utf16-bom"])
def test_bundle_loader_nasty_json(scratch_bundle, data):
    _load_manifest(scratch_bundle, data)


@pytest.mark.parametrize("path", ["a\x00b.onnx", "x" * 5000 + ".onnx", "/etc/passwd", "", ".", "sub/"],
                         ids=["nul", "too-long", "absolute", "empty", "dot", "dir"])
def test_bundle_file_paths_that_cannot_be_files(scratch_bundle, path):
    m = read_manifest(scratch_bundle)
    m["files"]["onnx_fp32"]["path"] = path
    _load_manifest(scratch_bundle, json.dumps(m).encode())
    with pytest.raises(BundleError):
        load_bundle(scratch_bundle)


def test_unreadable_manifest(scratch_bundle):
    if os.geteuid() == 0:
        pytest.skip("root reads anything")
    (scratch_bundle / "manifest.json").chmod(0)
    with pytest.raises(BundleError) as e:
        load_bundle(scratch_bundle)
    assert_one_line(e.value)


def test_engine_built_for_another_device_is_refused(scratch_bundle):
    m = read_manifest(scratch_bundle)
    target = {"gpu": "Orin (nvgpu)", "compute_capability": "8.7", "tensorrt": "10.3.0"}
    m["files"]["onnx_fp32"]["target"] = target
    (scratch_bundle / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(scratch_bundle)
    b.check_target("onnx_fp32", dict(target))  # the device it was built on: fine
    b.check_target("onnx_fp32", {**target, "driver": "550.1"})  # keys the engine does not pin: ignored
    with pytest.raises(BundleError) as e:
        b.check_target("onnx_fp32", {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                                     "tensorrt": "10.3.0"})
    msg = str(e.value)
    assert_one_line(e.value)
    assert "8.7" in msg and "9.0" in msg and "rebuild" in msg


# -- frames the model must not judge, and model output that failed its checks ----------------------
class OddFrames(FrameSource):
    """The synthetic line, with some frames swapped for ones of the wrong size or layout."""

    name = "odd"

    def __init__(self, n: int, odd: dict[int, np.ndarray]) -> None:
        self.inner = SyntheticLineSource(width=160, height=160, fps=None, defect_rate=0.3, seed=4, frames=n)
        self.odd = odd

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def read(self, timeout: float) -> Frame | None:
        f = self.inner.read(timeout)
        if f is not None and f.frame_id in self.odd:
            img = self.odd[f.frame_id]
            f = Frame(frame_id=f.frame_id, image=img, timestamp_ns=f.timestamp_ns, clock=f.clock, host_ns=f.host_ns,
                      bit_depth=12 if img.dtype == np.uint16 else 8)
        return f


class NaNRunner(Runner):
    """The real runner, but the ``i``-th call for ``i`` in ``bad`` returns NaN / Inf (with one
    worker and an unpaced line the i-th call is frame i)."""

    def __init__(self, inner: Runner, bad: dict[int, float]) -> None:
        self.inner, self.role, self.bad = inner, inner.role, bad
        self.calls = 0

    def run(self, x: np.ndarray) -> ExpertOutput:
        out = self.inner.run(x)
        i = self.calls
        self.calls += 1
        if i in self.bad:
            amap = out.anomaly_map.copy()
            amap[3, 3] = self.bad[i]
            return ExpertOutput(anomaly_map=amap, score=self.bad[i] if i % 2 else out.score)
        return out


def test_wrong_size_or_format_frames_are_counted_skips(broker, tmp_path, monkeypatch):
    import linecam.runtime.service as service

    bundle = make_tiny_bundle(tmp_path / "b", size=64, image_threshold=0.3, pixel_threshold=0.5)
    odd = {
        5: np.full((120, 160, 3), 255, np.uint8),            # another size (ROI changed)
        9: np.full((160, 160, 4), 255, np.uint8),            # RGBa: not a frame layout
        12: np.full((160, 160, 3), 0.5, np.float32),         # float samples
        15: np.full((160, 160, 1), 4095, np.uint16),         # mono12 on a colour line
        20: np.full((160, 160, 3), 0, np.uint8),             # fine: a dark frame is judged (NG)
    }
    monkeypatch.setattr(service, "open_source", lambda _cfg: OddFrames(30, odd))
    cfg = parse_config(line_config(bundle, broker.port, tmp_path, camera={"frames": 30},
                                   spool={"path": str(tmp_path / "spool.db")}), tmp_path / "x.yaml")
    events, summary = collect(broker.port, lambda: run_service(cfg), types=("verdict",))
    verdicts = {e.payload["frame_id"]: e.payload for e in events}
    for v in verdicts.values():
        schemas.validate(v)
    assert sorted(verdicts) == list(range(30))
    reasons = {i: v["reason"] for i, v in verdicts.items() if v["verdict"] == "SKIPPED"}
    assert reasons == {5: "wrong_frame_size", 9: "wrong_pixel_format", 12: "wrong_pixel_format",
                       15: "wrong_pixel_format"}
    assert all(verdicts[i]["score"] is None for i in reasons)
    assert verdicts[20]["verdict"] == "NG"
    c = summary.counters
    assert (c["skipped_wrong_frame_size"], c["skipped_wrong_pixel_format"], c["skipped"]) == (1, 3, 4)


def test_configured_frame_size_and_nan_model_output(broker, tmp_path, monkeypatch):
    import linecam.runtime.service as service

    bundle = make_tiny_bundle(tmp_path / "b", size=64, image_threshold=0.3, pixel_threshold=0.5)
    real = service.make_runner
    bad = {3: float("nan"), 4: float("inf"), 7: float("-inf")}
    monkeypatch.setattr(service, "make_runner", lambda *a, **k: NaNRunner(real(*a, **k), bad))
    cfg = parse_config(line_config(bundle, broker.port, tmp_path, camera={"frames": 20, "fps": None},
                                   runtime={"frame_size": [320, 320], "workers": 1},
                                   spool={"path": str(tmp_path / "spool.db")}), tmp_path / "x.yaml")
    events, summary = collect(broker.port, lambda: run_service(cfg), types=("verdict",))
    verdicts = sorted((e.payload for e in events), key=lambda v: v["frame_id"])
    assert [v["frame_id"] for v in verdicts] == list(range(20))
    skipped = {v["frame_id"]: v["reason"] for v in verdicts if v["verdict"] == "SKIPPED"}
    assert skipped == {3: "invalid_model_output", 4: "invalid_model_output", 7: "invalid_model_output"}
    for v in verdicts:
        assert v["score"] is None or math.isfinite(v["score"])
    assert summary.counters["invalid_output"] == 3

    # a configured frame size the camera does not deliver: every frame skipped, none judged
    cfg2 = parse_config(line_config(bundle, broker.port, tmp_path, camera={"frames": 10, "fps": None},
                                    runtime={"frame_size": [640, 480]},
                                    spool={"path": str(tmp_path / "spool2.db")}), tmp_path / "x.yaml")
    monkeypatch.setattr(service, "make_runner", real)
    events, summary = collect(broker.port, lambda: run_service(cfg2), types=("verdict",))
    assert sorted(e.payload["frame_id"] for e in events) == list(range(10))
    assert {e.payload["reason"] for e in events} == {"wrong_frame_size"}
    assert summary.counters["skipped_wrong_frame_size"] == 10


# -- the CLI: one line, the documented exit code ---------------------------------------------------
def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linecam", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=REPO)


def one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def cli_config(tmp_path: Path, bundle: Path, port: int, **extra) -> Path:
    cfg = {"camera": {"kind": "synthetic", "frames": 200, "fps": 30}, "model": {"bundle": str(bundle)},
           "mqtt": {"host": "127.0.0.1", "port": port}, "output": {"snapshots_dir": str(tmp_path / "snaps")},
           "spool": {"path": str(tmp_path / "spool.db")}}
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    p = tmp_path / "line.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.timeout(60)
def test_broker_authentication_failure_is_one_line_exit_5(tmp_path):
    from linecam.broker import MosquittoBroker

    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not found")
    pw = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(pw), "linecam", "right-one"], check=True, capture_output=True)
    bundle = make_tiny_bundle(tmp_path / "b")
    secret = tmp_path / "secret"
    secret.write_text("wrong-password-xyz\n")
    with MosquittoBroker(allow_anonymous=False, extra_config=[f"password_file {pw}"]) as broker:
        cfg = cli_config(tmp_path, bundle, broker.port, mqtt={"username": "linecam", "password_file": str(secret)})
        proc = run_cli("run", "--config", str(cfg))
    line = one_error_line(proc, 5, "refused", "mqtt.username")
    assert "wrong-password-xyz" not in proc.stderr
    assert line


@pytest.mark.parametrize("case, code, needle", [
    ("hash", 3, "sha256"),
    ("newer", 3, "upgrade linecam"),
    ("missing", 3, "is missing"),
    ("unknown_key", 2, "unknown key"),
    ("wrong_type", 2, "runtime.frame_timeout_s"),
    ("spool_corrupt", 2, "spool"),
])
def test_cli_bad_input_cases(tmp_path, case, code, needle):
    bundle = make_tiny_bundle(tmp_path / "b")
    extra: dict = {}
    if case == "hash":
        p = bundle / "model.onnx"
        data = bytearray(p.read_bytes())
        data[-10] ^= 0x01
        p.write_bytes(bytes(data))
    elif case == "newer":
        m = read_manifest(bundle)
        m["schema_version"] = 99
        (bundle / "manifest.json").write_text(json.dumps(m))
    elif case == "missing":
        (bundle / "model.onnx").unlink()
    elif case == "unknown_key":
        extra = {"spool": {"max_rowz": 5}}
    elif case == "wrong_type":
        extra = {"runtime": {"frame_timeout_s": "soon"}}
    elif case == "spool_corrupt":
        (tmp_path / "spool.db").write_bytes(b"garbage" * 1000)
    cfg = cli_config(tmp_path, bundle, 1, **extra)  # port 1: nothing must get that far
    one_error_line(run_cli("run", "--config", str(cfg)), code, needle)


_GOOD_MANIFEST: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _good_manifest(good_bundle):
    _GOOD_MANIFEST.update(read_manifest(good_bundle))
    yield
