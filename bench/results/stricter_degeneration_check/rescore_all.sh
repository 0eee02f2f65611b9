#!/bin/bash
# Saved greedy evaluations judged again by the degeneration check before (OLD: a checkout of 9a59430) and after
# (NEW: this commit) a sentence-long line written twice, a title written twice and an empty SECTION became degenerate.
# Usage: OLD=/path/to/checkout-9a59430 NEW=/path/to/this-checkout bash rescore_all.sh > rescore_all.txt
# The evaluations are this project's runs on disk (not in git); START / IFEVAL_START the plain model's.
START=/work/s24/out/ppo_plain_k4/eval-base
IFEVAL_START=/work/s25/ifeval_base
row() {  # label base run
  for tree in "$OLD" "$NEW"; do
    PYTHONPATH=$tree python $tree/eval/rescore.py "$2" "$3" 2>/dev/null | tail -1 | python -c "
import json, sys
d = json.loads(sys.stdin.read()); c = d['coherent_strict']; g = d['degenerate']
print(f\"$1 {'old' if '$tree' == '$OLD' else 'new'}: coherent strict {c['baseline_mean']:.3f} -> {c['run_mean']:.3f} ({c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]); degenerate {g['baseline_mean']:.3f} -> {g['run_mean']:.3f}\")"
  done
}
while IFS="|" read -r label base run; do row "$label" "$base" "$run"; done <<ROWS
ifprefs main job seed 42 (Dec 6)|$START|/work/s25/mainjob/eval
ifprefs main job seed 1 (Dec 6)|$START|/work/s26/mj_default_s1/eval
ifprefs main job LoRA+ seed 42|$START|/work/s26/mj_lp_s42/eval
ifprefs main job LoRA+ seed 1|$START|/work/s26/mj_lp_s1/eval
ifprefs main job reference-free seed 42|$START|/work/s26/mj_rf_s42/eval
ifprefs main job reference-free seed 1|$START|/work/s26/mj_rf_s1/eval
ifprefs DPO 280 seed 42|$START|/work/s25/dpo280/eval
ifprefs DPO 280 seed 1|$START|/work/s25/dpo280s1/eval
ifprefs SFT 400|$START|/work/s25/sft400/eval
ifprefs DPO 280 seed 42, trained on the refiltered data|$START|/work/s26/dpo280_v2/eval
IFEval main job seed 42|$IFEVAL_START|/work/s25/mainjob/ifeval
IFEval DPO 280 seed 42|$IFEVAL_START|/work/s25/dpo280/ifeval
IFEval DPO 280 seed 1|$IFEVAL_START|/work/s25/dpo280s1/ifeval
IFEval SFT 400|$IFEVAL_START|/work/s25/sft400/ifeval
IFEval DPO 280 seed 42, trained on the refiltered data|$IFEVAL_START|/work/s26/dpo280_v2/ifeval
ROWS
