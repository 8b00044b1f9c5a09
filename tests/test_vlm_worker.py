"""DescriptionWorker with a real (tiny, exported) VLM: one description per defect, backlog policies."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

from linecam.runtime.postprocess import Region
from linecam.runtime.vlm.engine import VlmEngine
from linecam.runtime.vlm.worker import DescriptionWorker
from linecam.schemas import validate

MAX_NEW = 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from linecam.export.vlm import export_vlm
    from linecam.export.vlm.tiny import build_model_folder

    root = tmp_path_factory.mktemp("vlm")
    model = build_model_folder("idefics3", root / "model")
    export_vlm(model, root / "bundle", quantize=())
    return root / "bundle"


@pytest.fixture(scope="module")
def engine(bundle):
    return VlmEngine(bundle, intra_op_threads=1)


class _Gate:
    """The real engine behind a gate: the first generate waits until released (fills the backlog)."""

    def __init__(self, engine):
        self.engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(30)
        return self.engine.generate(*args, **kwargs)


def _defects(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        x, y = int(rng.integers(0, 140)), int(rng.integers(0, 100))
        out.append((img, [Region((x, y, 12, 10), 120, (x + 6.0, y + 5.0), 1.0 + i)], str(uuid.uuid4()), i))
    return out


def _worker(eng, sink, **kw):
    lock = threading.Lock()

    def publish(msg):
        validate(msg)  # every message on the wire is schema-valid
        with lock:
            sink.append(msg)

    return DescriptionWorker(eng, publish, line="l1", camera="c1", max_new_tokens=MAX_NEW,
                             model_info={"name": "tiny", "sha256": "0" * 64}, **kw)


def test_every_defect_gets_exactly_one_description(engine):
    sink: list[dict] = []
    w = _worker(engine, sink, backlog=16).start()
    defects = _defects(6)
    verdict_ids = {d[2]: str(uuid.uuid4()) for d in defects}
    for img, regs, did, fid in defects:
        assert w.submit(img, regs, did, frame_id=fid, verdict_event_id=verdict_ids[did], threshold=1.0)
    assert w.wait_idle(60)
    w.stop()
    assert sorted(m["defect_event_id"] for m in sink) == sorted(d[2] for d in defects)
    for m in sink:
        assert m["status"] == "ok" and m["text"] is not None and 1 <= m["n_tokens"] <= MAX_NEW
        assert m["verdict_event_id"] == verdict_ids[m["defect_event_id"]]
        assert m["frame_id"] == next(d[3] for d in defects if d[2] == m["defect_event_id"])
        assert m["n_regions"] == 1 and "Region 1" in m["prompt"]
        assert m["latency_ms"]["total"] >= m["latency_ms"]["queue"] >= 0
    # The description is the engine's own greedy output for that crop and prompt.
    first = next(m for m in sink if m["defect_event_id"] == defects[0][2])
    g = w.builder.build(defects[0][0], defects[0][1])
    assert first["text"] == engine.generate(g.image, g.prompt, max_new_tokens=MAX_NEW).text
    c = w.counters
    assert c["submitted"] == c["described"] == c["published"] == 6 and c["skipped_backlog"] == c["errors"] == 0


@pytest.mark.parametrize("policy", ["newest_first", "skip"])
def test_backlog_policy_when_the_line_outruns_the_vlm(engine, policy):
    gate = _Gate(engine)
    sink: list[dict] = []
    w = _worker(gate, sink, backlog=2, policy=policy).start()
    d = _defects(5, seed=1)
    ids = [x[2] for x in d]
    w.submit(d[0][0], d[0][1], ids[0], frame_id=0)
    assert gate.entered.wait(30)  # job 0 is running, the backlog is empty
    accepted = [w.submit(img, regs, did, frame_id=fid) for img, regs, did, fid in d[1:]]
    assert w.backlog_depth == 2
    gate.release.set()
    assert w.wait_idle(60)
    w.stop()
    by_id = {m["defect_event_id"]: m for m in sink}
    assert len(sink) == 5 and set(by_id) == set(ids)  # still exactly one per defect
    if policy == "newest_first":
        assert accepted == [True, True, True, True]
        dropped, order = [ids[1], ids[2]], [ids[0], ids[4], ids[3]]
    else:
        assert accepted == [True, True, False, False]
        dropped, order = [ids[3], ids[4]], [ids[0], ids[1], ids[2]]
    for i in dropped:
        assert by_id[i]["status"] == "skipped" and by_id[i]["reason"] == "backlog_full" and by_id[i]["text"] is None
    assert [m["defect_event_id"] for m in sink if m["status"] == "ok"] == order
    c = w.counters
    assert (c["submitted"], c["described"], c["skipped_backlog"], c["published"]) == (5, 3, 2, 5)


def test_stop_without_drain_skips_pending_and_cancels(engine):
    gate = _Gate(engine)
    sink: list[dict] = []
    w = _worker(gate, sink, backlog=4).start()
    d = _defects(3, seed=2)
    for img, regs, did, fid in d:
        w.submit(img, regs, did, frame_id=fid)
    assert gate.entered.wait(30)
    threading.Timer(0.2, gate.release.set).start()
    w.stop(drain=False, timeout=30)
    assert len(sink) == 3
    assert sum(m["status"] == "skipped" and m["reason"] == "shutdown" for m in sink) == 2
    running = next(m for m in sink if m["status"] == "ok")
    assert running["stop_reason"] == "cancelled" and running["n_tokens"] == 1
    late = _defects(1, seed=3)[0]
    assert not w.submit(late[0], late[1], late[2], frame_id=9)
    assert sink[-1]["defect_event_id"] == late[2] and sink[-1]["reason"] == "shutdown"


def test_engine_failure_is_published_as_error(engine):
    class Broken:
        def generate(self, *a, **k):
            raise RuntimeError("boom")

    sink: list[dict] = []
    w = _worker(Broken(), sink).start()
    img, regs, did, fid = _defects(1)[0]
    w.submit(img, regs, did, frame_id=fid)
    assert w.wait_idle(30)
    w.stop()
    assert [(m["status"], m["reason"]) for m in sink] == [("error", "vlm_error: RuntimeError")]
    assert w.counters["errors"] == 1


def test_bad_frame_gets_an_error_description_and_submit_does_not_raise(engine):
    sink: list[dict] = []
    w = _worker(engine, sink).start()
    did = str(uuid.uuid4())
    assert w.submit(np.zeros(7, np.uint8), [], did, frame_id=1) is False
    w.stop()
    assert [(m["defect_event_id"], m["status"]) for m in sink] == [(did, "error")]
    assert sink[0]["reason"].startswith("prompt_error")


def test_factory_load_error_is_raised_by_start():
    def factory():
        raise FileNotFoundError("no bundle")

    w = DescriptionWorker(factory, lambda m: None, line="l", camera="c")
    with pytest.raises(FileNotFoundError):
        w.start()
    w.stop()


BLOCK_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers'):\n"
    "            raise ImportError('blocked in this test')\n"
    "sys.meta_path.insert(0, _Block())\n"
)


def test_runtime_runs_without_torch(bundle, engine):
    code = BLOCK_TORCH + (
        "import numpy as np\n"
        "from linecam.runtime.vlm.engine import VlmEngine\n"
        "from linecam.runtime.vlm.worker import DescriptionWorker\n"
        f"eng = VlmEngine({str(bundle)!r}, intra_op_threads=1)\n"
        "img = np.zeros((40, 50, 3), np.uint8)\n"
        "print(eng.generate(img, 'Describe the defect .', max_new_tokens=4, stop_token_ids=[]).tokens)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ref = engine.generate(np.zeros((40, 50, 3), np.uint8), "Describe the defect .", max_new_tokens=4,
                          stop_token_ids=[]).tokens
    assert proc.stdout.strip() == str(ref)
