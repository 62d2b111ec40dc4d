"""The model: what a request asks it for (``request``), what its errors mean (``faults``), its profile and the
limits it makes (``profile``), the diffusers adapter (``pipeline``), and the embedded models (``tiny_model``,
``scenes``, ``weights/``). Only ``pipeline`` and ``tiny_model`` import torch."""
