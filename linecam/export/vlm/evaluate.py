"""How far a student's descriptions agree with the reference (teacher or reviewed) text.

The daemon's prompt asks for three things: the defect's *type*, *where* it is and *how
large* it is. Those parts are pulled out of both texts with small vocabularies and
compared exactly; the rest of the wording is scored by text overlap (ROUGE-L F1 on
lower-case words), since two correct sentences rarely share every word.

Per record: ``fields`` = the structured parts the *reference* states; the record
``matches`` when the student states every one of them with the same value (a
reference that states none is compared as normalised full text). ``agreement`` of a
set = the share of matching records: the number the export gate reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Defect words understood out of the box (MVTec AD's defect folders plus common shop-floor
#: terms). Dataset labels and ``--kinds`` are added per run.
DEFAULT_KINDS: tuple[str, ...] = (
    "scratch", "dent", "stain", "crack", "chip", "spot", "hole", "contamination", "missing", "bent", "broken",
    "cut", "fold", "glue", "rust", "burr", "deformation", "discoloration", "misalignment", "tear", "squeeze",
    "poke", "imprint", "thread", "oil", "color", "flip", "rough", "crease", "pit", "bubble", "blister", "warp",
    "flash", "void", "residue", "dust", "fiber", "hair", "particle", "corrosion", "abrasion", "splatter",
    "liquid", "fabric", "swap", "porosity", "weld", "inclusion", "mark",
)
#: Word -> size class.
SIZE_WORDS: dict[str, str] = {
    "tiny": "small", "small": "small", "minor": "small", "little": "small", "slight": "small",
    "medium": "medium", "moderate": "medium", "mid": "medium",
    "large": "large", "big": "large", "huge": "large", "major": "large", "extensive": "large",
}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTRE = {"center", "centre", "middle", "central"}
_WORD = re.compile(r"[a-z0-9]+")
FIELDS = ("kind", "location", "size")


def words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def _stem(w: str) -> str:
    # "scratches" -> "scratch", "holes" -> "hole", "cracked" -> "crack": enough for defect nouns
    # (applied to the vocabulary too, so both sides meet on the same form).
    if len(w) > 4:
        if w.endswith(("ches", "shes", "sses", "xes")) or w.endswith("ed"):
            return w[:-2]
        if w.endswith("s") and not w.endswith("ss"):
            return w[:-1]
    return w


class Vocabulary:
    """The defect kinds a run recognises (single words or phrases, e.g. ``"metal contamination"``)."""

    def __init__(self, kinds: Iterable[str] = ()) -> None:
        phrases = {tuple(_stem(w) for w in words(k.replace("_", " "))) for k in (*DEFAULT_KINDS, *kinds)}
        # Longest phrase first, so "metal contamination" wins over "contamination" at the same place.
        self.kinds = sorted((p for p in phrases if p), key=lambda p: (-len(p), p))

    def extract(self, text: str | None) -> dict[str, str]:
        """The structured parts ``text`` states: a subset of ``kind``, ``location``, ``size``."""
        ws = words(text)
        stems = [_stem(w) for w in ws]
        out: dict[str, str] = {}
        for i in range(len(stems)):
            hit = next((p for p in self.kinds if tuple(stems[i:i + len(p)]) == p), None)
            if hit is not None:
                out["kind"] = " ".join(hit)
                break
        v = next((_VERTICAL[w] for w in ws if w in _VERTICAL), None)
        h = next((_HORIZONTAL[w] for w in ws if w in _HORIZONTAL), None)
        if v or h:
            out["location"] = " ".join(x for x in (v, h) if x)
        elif any(w in _CENTRE for w in ws):
            out["location"] = "center"
        size = next((SIZE_WORDS[w] for w in ws if w in SIZE_WORDS), None)
        if size is not None:
            out["size"] = size
        return out


def rouge_l(reference: str | None, candidate: str | None) -> float:
    """ROUGE-L F1 of lower-case word sequences (1.0 = same words in the same order)."""
    a, b = words(reference), words(candidate)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


@dataclass(slots=True)
class Judgement:
    reference: dict[str, str]
    candidate: dict[str, str]
    matches: bool
    field_match: dict[str, bool]
    overlap: float
    text_exact: bool


def judge(reference: str | None, candidate: str | None, vocab: Vocabulary) -> Judgement:
    ref, cand = vocab.extract(reference), vocab.extract(candidate)
    fm = {k: cand.get(k) == v for k, v in ref.items()}
    text_exact = words(reference) == words(candidate)
    return Judgement(ref, cand, all(fm.values()) if fm else text_exact, fm, rouge_l(reference, candidate),
                     text_exact)


@dataclass(slots=True)
class Agreement:
    """Scores of one set of records (see the module doc)."""

    n: int = 0
    agreement: float = 0.0  # share of records whose structured parts all match
    fields: dict[str, float] = field(default_factory=dict)  # per structured part: share matching
    overlap: float = 0.0  # mean ROUGE-L F1
    text_exact: float = 0.0  # share of identical texts (word level)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "agreement": round(self.agreement, 4),
                "fields": {k: round(v, 4) for k, v in self.fields.items()}, "overlap": round(self.overlap, 4),
                "text_exact": round(self.text_exact, 4), "samples": self.samples}


def score(pairs: Sequence[tuple[str, str | None, str | None]], vocab: Vocabulary,
          max_samples: int = 50) -> Agreement:
    """``pairs``: (record id, reference text, student text)."""
    if not pairs:
        return Agreement()
    js = [judge(ref, cand, vocab) for _, ref, cand in pairs]
    per_field = {f: [j.field_match[f] for j in js if f in j.field_match] for f in FIELDS}
    samples = [{"id": rid, "reference": ref, "student": cand, "match": j.matches,
                "fields": {"reference": j.reference, "student": j.candidate}}
               for (rid, ref, cand), j in zip(pairs[:max_samples], js)]
    return Agreement(
        n=len(js), agreement=sum(j.matches for j in js) / len(js),
        fields={f: sum(v) / len(v) for f, v in per_field.items() if v},
        overlap=sum(j.overlap for j in js) / len(js), text_exact=sum(j.text_exact for j in js) / len(js),
        samples=samples)
