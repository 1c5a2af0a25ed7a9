"""benchmarks/run_all.py formats what the benchmarks report and rewrites only README's marked block
(no benchmark runs here: the results are made up, the formatting and the file surgery are real)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results() -> dict:
    row = {"ours_ms": 1.0, "peer_ms": 2.0, "median": 0.5, "paired": 0.55, "min_ratio": 1.01, "added_us": 0.4,
           "paired_ci": [0.5, 0.6], "cpu_paired": 0.9, "cpu_paired_ci": [0.85, 0.95]}
    old = {k: v for k, v in row.items() if "ci" not in k and "cpu" not in k}  # a result from before the CPU column
    coll = {"results": {"8 MiB": {"rows": {"fwd+bwd / copy": row, "fwd+bwd / reduce": old}},
                        "64 KiB": {"rows": {"fwd+bwd / copy": row, "fwd+bwd / reduce": old}}},
            "_command": "python benchmarks/bench_collectives.py"}
    fake_row = {**old, "added_us": 20.0}
    fake = {"results": {"8 MiB": {"rows": {"fwd+bwd / copy": fake_row, "fwd+bwd / reduce": fake_row}},
                        "64 KiB": {"rows": {"fwd+bwd / copy": fake_row, "fwd+bwd / reduce": fake_row}}},
            "_command": "python benchmarks/bench_collectives.py --fake"}
    tp = {"results": {k: {"ours_ms": 3.0, "peer_ms": 4.0, "median": 0.75, "paired": 0.7, "max_diff": 0.0}
                      for k in ("mlp", "attention")}, "_command": "python benchmarks/bench_tensor_parallel.py"}
    dp = {"rows": {"ours": {"median_ms": 250.0, "ratio": 0.9, "paired": 0.88, "cpu_ms": 400.0, "cpu_ratio": 0.87}},
          "_command": "python benchmarks/dp_lightning_vs_ddp.py"}
    return {
        "dp_lightning": dp,
        "tensor_parallel_256": tp,
        "collectives": coll,
        "collectives_fake": fake,
        "compile": {"args": {"d_model": 256, "tokens": 64, "backend": "inductor"}, "_command": "c",
                    "results": {"eager_ms": 2.0, "compiled_ms": 1.5, "median": 0.75, "paired": 0.8,
                                "compile_s": 50.0, "max_diff": 1e-7}},
    }


def test_render_and_rewrite_only_the_marked_block(tmp_path: Path) -> None:
    run_all = _run_all()
    block = run_all.render(_results(), "HEADER")
    assert block.startswith(run_all.BEGIN) and block.rstrip().endswith(run_all.END)
    assert "| mlp | 0.750 / 0.700 (3.0 vs 4.0 ms) | (not run) |" in block
    # real wall, its interval, real CPU, the no-op backend's added us, the bound 1 + 20 us / 2 ms
    assert "| fwd+bwd / copy | 0.500 / 0.550 | [0.500, 0.600] | 0.900 [0.850, 0.950] | 1.010, +20.0 | 1.010 |" in block
    assert "| fwd+bwd / reduce | 0.500 / 0.550 | - | - | 1.010, +20.0 | 1.010 |" in block
    assert "| 2.00 | 1.50 | 0.750 / 0.800 | 50 |" in block
    assert "| ours | 0.900 | 0.880 | 0.870 | 250.0 |" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run_all.BEGIN}\nold table\n{run_all.END}\noutro\n")
    run_all.write_readme(readme, block)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text and "HEADER" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        run_all.write_readme(readme, block)
