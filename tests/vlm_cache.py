"""transformers' generation cache as the decoder graph's state tensors (for the VLM parity tests)."""

from __future__ import annotations

import numpy as np


def cache_tensors(cache) -> list[np.ndarray]:
    """Per layer, in the graph's order: key, value (full attention) or conv state, recurrent state
    (Qwen3.5 linear attention; the conv state's last K - 1 columns, the only ones a causal
    convolution of width K reads again)."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "conv_states"):
            out += [layer.conv_states[0][..., 1:].numpy(), layer.recurrent_states[0].numpy()]
        else:
            out += [layer.keys.numpy(), layer.values.numpy()]
    return out
