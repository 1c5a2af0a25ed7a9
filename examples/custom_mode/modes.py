"""A parallel mode written outside the library: named in YAML by its class_path, nothing registered.

``InterleavedData`` splits every DATA group into ``parts`` interleaved sub-groups (ranks 0, 2, 4, ...
and 1, 3, 5, ... of the group when parts=2), the shape a hierarchical or 2-level all-reduce uses.
"""

from __future__ import annotations

import numpy as np

from lightning_parallelctx import ProcessGroupInitializer
from lightning_parallelctx.errors import ParallelConfigError


class InterleavedData(ProcessGroupInitializer):
    def __init__(self, name: str = "data_interleaved", parts: int = 2):
        self.name, self.parts = name, parts

    def groups(self, layout):
        data = layout.groups("data")  # (num_groups, dp), each row sorted
        if data.shape[1] % self.parts:
            raise ParallelConfigError(
                f"mode {self.name!r}: parts={self.parts} does not divide the data-parallel size {data.shape[1]}"
            )
        # row g, offset k: every parts-th member starting at k
        groups = np.concatenate([data[:, k :: self.parts] for k in range(self.parts)])
        return groups[np.argsort(groups[:, 0], kind="stable")]

    def describe(self) -> str:
        return f"DATA interleaved in {self.parts} parts"
