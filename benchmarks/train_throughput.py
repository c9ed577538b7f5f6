"""Training throughput of the MLP deferral head, in trace rows per minute (goal: >= 1M on 2 CPU cores).

Synthetic reference traces (every position feature, gap labels) are written as parquet shards,
then one epoch of ``trainer.fit`` is timed: reading batches from the memory-mapped Arrow files,
the forward and backward passes and the optimiser, as train-deferral runs them.

    python benchmarks/train_throughput.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from speccascade.data import traces
from speccascade.deferral import features as F
from speccascade.training import DeferralModule, TraceDataModule


def synthetic_traces(directory: Path, rows: int, rows_per_example: int = 50) -> None:
    rng = np.random.default_rng(0)
    cols = {name: rng.random(rows).astype(np.float32) for name in F.POSITION_FEATURES}
    cols["gap"] = (rng.random(rows) - 0.5).astype(np.float32)
    ids = np.array([f"ex-{i // rows_per_example:07d}" for i in range(rows)], dtype=object)
    traces.ShardWriter(directory, 0).write({"example_id": ids} | cols, sorted(set(ids)))
    traces.write_manifest(directory, {"config": {}, "feature_spec": F.spec()}, complete=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_traces(Path(tmp), args.rows)
        data = TraceDataModule([tmp], list(F.POSITION_FEATURES), "classification", 0.2, args.batch_size, 0)
        data.setup()
        module = DeferralModule(list(F.POSITION_FEATURES), data.mean, data.std)
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
    rows = len(data.train_rows)
    result = {"train_rows": rows, "seconds": seconds, "rows_per_minute": rows / seconds * 60, "goal_rows_per_minute": 1_000_000}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
