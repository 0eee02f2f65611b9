"""Run a recipe with one process failing mid-run, for tests/integration/test_distributed.py:

    accelerate launch --multi_gpu --num_processes 2 tests/support/fail_on_rank.py 1 recipes/dpo.py ARGS...

Process RANK (here 1) raises at optimizer step 2, after a step every process completed together, where the
trainers check the loss (align.trainers.common.check_loss). The fault is installed here, before the recipe runs as
`__main__`: the recipes carry no test hooks.
"""

import os
import runpy
import sys

import align.trainers.common

rank, recipe = sys.argv[1], sys.argv[2]
check_loss = align.trainers.common.check_loss


def failing_check_loss(loss, step):
    if os.environ.get("RANK", "0") == rank and step == 2:
        raise RuntimeError(f"rank {rank}: injected failure at step 2")
    return check_loss(loss, step)


align.trainers.common.check_loss = failing_check_loss
sys.argv = [recipe, *sys.argv[3:]]
runpy.run_path(recipe, run_name="__main__")
