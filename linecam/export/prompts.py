"""The text expert's prompts (``export-engine text-expert --prompts prompts.yaml``).

WinCLIP-style ensembles: every *state* ("flawless {}", "damaged {}") is put into every
*template* ("a photo of a {}.") with the object's name, and the text embeddings of all the
sentences of one side are averaged into one normal and one abnormal embedding (the ensemble
is what makes zero-shot CLIP scores usable: a single sentence is noisy). Named *referring*
prompts (RIAS: "the region a referring expression names") each get their own map and label::

    object: metal bracket
    normal: ["flawless {}", "perfect {}"]          # optional: WinCLIP's list by default
    abnormal: ["damaged {}", "{} with a defect"]   # optional: WinCLIP's list; [] with regions
    templates: ["a photo of a {}."]                # optional: WinCLIP's list by default
    regions:                                       # optional: one anomaly map per name
      scratch: "a scratch on the metal rim"
      dent: ["a dent in the {}", "a dented {}"]    # several phrasings are averaged

``{}`` in a state or region phrase is replaced by the object's name; region phrases are used
as written (they are whole sentences), not put into the templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from linecam.errors import BundleError

# WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023), shortened: the states
# and a representative subset of its templates.
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
             "a bright photo of a {}.", "a dark photo of the {}.", "a photo of the {}.", "a photo of a {}.",
             "a photo of the small {}.", "a photo of the large {}.", "there is a {} in the scene.",
             "this is a {} in the scene.", "a photo of a {} for visual inspection.",
             "a photo of the {} for anomaly detection."]
#: Region names become labels in MQTT events and VLM prompts: short identifiers.
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ .-]{0,39}$")
EXAMPLE = 'object: metal bracket\nregions:\n  scratch: "a scratch on the metal rim"'


class PromptSpec(BaseModel):
    """What ``prompts.yaml`` holds (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    object: str = Field(min_length=1, max_length=80)
    normal: list[str] = Field(default_factory=lambda: list(NORMAL_STATES), min_length=1)
    abnormal: list[str] = Field(default_factory=lambda: list(ABNORMAL_STATES))
    templates: list[str] = Field(default_factory=lambda: list(TEMPLATES), min_length=1)
    regions: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("regions", mode="before")
    @classmethod
    def _one_or_more(cls, v: object) -> object:
        if isinstance(v, dict):
            return {k: [p] if isinstance(p, str) else p for k, p in v.items()}
        return v

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{}" not in t]
        if bad:
            raise ValueError(f"template {bad[0]!r} has no '{{}}' where the state goes")
        return v

    @model_validator(mode="after")
    def _complete(self) -> "PromptSpec":
        if not self.abnormal and not self.regions:
            raise ValueError("no abnormal prompts: give 'abnormal' states or named 'regions'")
        for name, phrases in self.regions.items():
            if not NAME_RE.match(name):
                raise ValueError(f"region name {name!r}: use up to 40 letters, digits, '_', '-', '.', spaces")
            if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
                raise ValueError(f"region {name!r} has no phrase")
        return self

    # -- sentences ---------------------------------------------------------------------------

    def _fill(self, state: str) -> str:
        return state.replace("{}", self.object)

    def ensemble(self, states: list[str]) -> list[str]:
        """Every state in every template: the sentences averaged into one embedding."""
        return [t.replace("{}", self._fill(s)) for s in states for t in self.templates]

    def normal_sentences(self) -> list[str]:
        return self.ensemble(self.normal)

    def abnormal_sentences(self) -> list[str]:
        return self.ensemble(self.abnormal)

    def region_sentences(self) -> dict[str, list[str]]:
        return {k: [self._fill(p) for p in v] for k, v in self.regions.items()}

    @property
    def labels(self) -> list[str]:
        """The named prompts in file order: one map (and label) each."""
        return list(self.regions)


def load_prompts(path: str | Path | None) -> PromptSpec:
    """``prompts.yaml`` -> :class:`PromptSpec`; one-line :class:`BundleError` on a bad file."""
    import yaml

    if path is None:
        raise BundleError(f"give --prompts <prompts.yaml>, e.g. {EXAMPLE!r}")
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise BundleError(f"prompts file {p} does not exist: write one, e.g. {EXAMPLE!r}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"cannot read prompts file {p} ({first}): it must be YAML, e.g. {EXAMPLE!r}") from None
    if not isinstance(data, dict):
        raise BundleError(f"prompts file {p} is not a YAML mapping: it needs at least 'object: <part name>'")
    try:
        return PromptSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        raise BundleError(f"prompts file {p}: field '{loc}': {msg}; see README 'Text-prompted expert'") from None
