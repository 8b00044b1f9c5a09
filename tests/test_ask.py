"""Questions about a stored defect answered by a (tiny, random-weight) VLM bundle: the answer
path, not its wisdom. ``linecam ask`` on a recorded defect, two turns in one conversation;
the first turn decodes exactly what the VLM engine's own ``generate`` decodes, and the
follow-up, fed on top of the kept KV cache, exactly what a fresh run over the whole
conversation decodes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from linecam.cli import cli  # noqa: E402
from linecam.station.ask import Asker, _turn_format  # noqa: E402
from linecam.station.store import event_row, open_store  # noqa: E402

DEFECT = {"schema": "linecam.defect", "schema_version": 1, "type": "defect", "event_id": "defect-1",
          "verdict_event_id": "verdict-1", "line": "t", "camera": "c0", "sent_at": "2026-12-02T10:15:00.000Z",
          "frame_id": 42, "score": 2.0, "image_size": [300, 200], "snapshot": None,
          "regions": [{"bbox": [100, 50, 40, 30], "area": 1200, "centroid": [120.0, 65.0], "max_score": 2.0}]}


def jpeg() -> bytes:
    img = np.full((200, 300, 3), 90, np.uint8)
    img[50:80, 100:140] = 250
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_ask_matches_engine_and_cache_matches_fresh_run(vlm_bundle):  # noqa: F811
    a = Asker(vlm_bundle, precision="fp32", max_new_tokens=6)
    first = a.ask(DEFECT, jpeg(), "is this a scratch or a dent?")
    conv = a._conversations[first["conversation_id"]]
    # turn 1 = the engine's own greedy generate on the same grounded prompt
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    g = a.builder.build(rgb, DEFECT["regions"])
    enc = a.engine.encode(g.image, f"{g.prompt}\nQuestion: is this a scratch or a dent?")
    ref = a.engine.generate_encoded(enc, max_new_tokens=6)
    assert a.engine.tokenizer.decode(ref.tokens, skip_special_tokens=True).strip() == first["answer"]
    turn1 = list(ref.tokens)
    # turn 2 on the kept cache = a fresh run over the whole conversation
    second = a.ask(DEFECT, jpeg(), "how far from the edge?", first["conversation_id"])
    assert second["conversation_id"] == first["conversation_id"] and second["turn"] == 2
    assert second["cached_tokens"] == enc.n_tokens + len(turn1) - 1
    follow = a.engine.tokenizer.encode("\n" + _turn_format(a.engine.manifest.prompt.format)
                                       .replace("{prompt}", "how far from the edge?"), add_special_tokens=False).ids
    full = np.asarray([[*enc.input_ids[0].tolist(), *turn1, *follow]], dtype=np.int64)
    fresh = a.engine.generate_encoded(type(enc)(full, enc.vision_feeds, enc.grids), max_new_tokens=6)
    assert a.engine.tokenizer.decode(fresh.tokens, skip_special_tokens=True).strip() == second["answer"]
    assert conv.length > second["cached_tokens"]


def test_linecam_ask_on_a_recorded_defect(vlm_bundle, tmp_path):  # noqa: F811
    db = str(tmp_path / "rec.db")
    store = open_store(db)
    store.add_events([event_row("linecam/t/c0/defect", DEFECT)])
    store.add_snapshot("defect-1", jpeg(), "mqtt")
    store.close()
    r = CliRunner().invoke(cli, ["ask", "--db", db, "--event", "defect-1", "--vlm-bundle", str(vlm_bundle),
                                 "--vlm-precision", "fp32", "--max-new-tokens", "6", "--json",
                                 "is this a scratch or a dent?", "how far from the edge?"])
    assert r.exit_code == 0, r.output
    answers = [json.loads(x) for x in r.output.splitlines() if x.startswith("{")]
    assert [x["turn"] for x in answers] == [1, 2]
    assert answers[0]["conversation_id"] == answers[1]["conversation_id"]
    assert answers[1]["cached_tokens"] > answers[1]["prompt_tokens"] > 0
    assert all(isinstance(x["answer"], str) and x["n_tokens"] >= 1 for x in answers)
    r = CliRunner().invoke(cli, ["ask", "--db", db, "--event", "nope", "--vlm-bundle", str(vlm_bundle), "q"])
    assert r.exit_code == 1 and "no defect nope" in r.output
