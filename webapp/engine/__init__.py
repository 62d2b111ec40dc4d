"""One worker's engine: admission and batching (``scheduler``), loading (``loader``), running a batch and who is
charged when it fails (``runner``), and the coordinator of them (``core.Engine``). No HTTP, no torch."""
