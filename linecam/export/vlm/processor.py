"""transformers' processor of a local VLM folder, also where torchvision is missing.

The Qwen-VL processors carry a video processor that needs torchvision; images never go
through it. Export (the chat format, :func:`linecam.export.vlm.export._prompt_format`)
and the raw-input parity tests load the processor through :func:`load_hf_processor`.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_hf_processor(folder: Path):
    """transformers' processor for ``folder``: ``AutoProcessor``, or, where the Qwen video processor
    needs torchvision and it is not installed, the same processor class built from
    ``AutoImageProcessor`` + ``AutoTokenizer`` without a video processor (images go through the
    identical code)."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except ValueError as e:
        if "torchvision" not in str(e):
            raise
    folder = Path(folder)
    name = None
    for f in ("processor_config.json", "preprocessor_config.json"):
        if (folder / f).is_file():
            name = name or json.loads((folder / f).read_text()).get("processor_class")
    if name is None:
        raise ValueError(f"{folder} names no processor_class and AutoProcessor needs torchvision")
    base = getattr(transformers, name)
    template = folder / "chat_template.jinja"

    class ImageOnly(base):  # type: ignore[misc, valid-type]
        # The processor's attributes come from its __init__ signature: this one has no video processor.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(str(folder), local_files_only=True),
                     tokenizer=AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                     chat_template=template.read_text() if template.is_file() else None)
