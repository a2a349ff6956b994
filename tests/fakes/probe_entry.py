"""Stand-in for examples/pretrain_s2l.py in launcher tests: proves a real distributed launch, quickly.

Each rank joins the gloo process group torchrun described (RANK, WORLD_SIZE, MASTER_ADDR/PORT), all-reduces
rank + 1, and writes what it saw to $PROBE_OUT/rank<R>.json; it also prints one line per rank.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def main() -> None:
    env = {key: os.environ.get(key) for key in KEYS}
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])  # [1]
    dist.all_reduce(total)
    report = {"env": env, "argv": sys.argv[1:], "all_reduce": total.item()}
    Path(os.environ["PROBE_OUT"], f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    print(f"probe rank {dist.get_rank()}/{dist.get_world_size()} all_reduce={total.item():g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
