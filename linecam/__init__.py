"""linecam: region expert + compact VLM from the workstation to the factory line.

The daemon side (``linecam.camera``, ``linecam.runtime``) imports without torch;
training and export code lives in ``linecam.export`` behind the ``export`` extra.
"""

__version__ = "0.1.0"
