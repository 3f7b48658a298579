"""`python tests/rows_read.py ARGS...` is `aligntrain ARGS...` that also records every read of shard rows:
one line `[split, [row, ...]]` per read, in $ROWS_DIR/rank-<RANK>.jsonl (rank 0 without a launcher).
Launched by `accelerate launch`, it shows which rows each process of a real run takes."""

import json
import os
import sys
from pathlib import Path

from aligntrain import data
from aligntrain.cli import main

read_rows = data.ShardSplit.rows


def recorded_rows(split, indices):
    with open(Path(os.environ["ROWS_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.jsonl", "a") as log:
        log.write(json.dumps([split.name, [int(i) for i in indices]]) + "\n")
    return read_rows(split, indices)


if __name__ == "__main__":
    data.ShardSplit.rows = recorded_rows
    sys.exit(main())
