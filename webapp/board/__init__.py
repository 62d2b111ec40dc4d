"""The readiness board: the shared-memory slots (``slots``), the one writer of a worker's state (``lifecycle``),
the judgement of the slots (``readiness``), and the metrics folder that lives beside the board (``metric_files``)."""
