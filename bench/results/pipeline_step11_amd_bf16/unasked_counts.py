"""Replies (greedy) with each format nobody asked for, per eval dir: python unasked_counts.py EVAL..."""
import json, sys
from collections import Counter
from align.evaluation.degeneration import unasked_formats



rows = [json.loads(l) for l in open("datasets/ifprefs/eval.jsonl")]
constraints = {r["id"]: r["constraints"] for r in rows}
for d in sys.argv[1:]:
    c = Counter(); n = 0
    for l in open(f"{d}/generations.jsonl"):
        g = json.loads(l)
        if g.get("mode", "greedy") != "greedy":
            continue
        n += 1
        pid = g.get("prompt_id") or g.get("id")
        c.update(set(unasked_formats(g.get("completion") or g.get("reply") or g.get("text"), constraints[pid])))
    print(d, n, dict(c.most_common()))
