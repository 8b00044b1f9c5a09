"""Export compact VLMs (Qwen2.5-VL, Idefics3/SmolVLM) to linecam VLM bundles: see :func:`export_vlm`."""

from linecam.export.vlm.export import export_vlm, load_hf_model

__all__ = ["export_vlm", "load_hf_model"]
