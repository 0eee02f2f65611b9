"""Side by side: greedy replies of several eval dirs for prompts [lo, hi), with the check's verdicts (rescored)."""
# used as: python replies_side.py 260 280 replies_260_279.md start=OUT/base/eval sft=OUT/sft/eval dpo=OUT/dpo/eval ppo=OUT/ppo/eval
import json, sys
from align.evaluation.degeneration import check_reply
from align.evaluation.metrics import coherent_strict
from align.evaluation.verifier import verify
lo, hi, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
runs = [a.split("=", 1) for a in sys.argv[4:]]
rows = {name: [json.loads(l) for l in open(f"{d}/generations.jsonl")] for name, d in runs}
rows = {n: [r for r in rs if r["mode"] == "greedy"] for n, rs in rows.items()}
lines, counts = [], {n: [0, 0, 0] for n, _ in runs}
for i in range(lo, hi):
    first = rows[runs[0][0]][i]
    lines.append(f"## {first['prompt_id']}\n\n**prompt:** {first['prompt'][-1]['content']}\n")
    for name, _ in runs:
        r = rows[name][i]
        assert r["prompt_id"] == first["prompt_id"]
        v = verify(r["reply"], r["constraints"]) if r["constraints"] else None
        d = check_reply(r["reply"], r["prompt"], r["constraints"], ended=r.get("eos", False))
        cs = coherent_strict(v.strict if v else None, d)
        counts[name][0] += bool(cs); counts[name][1] += d.degenerate; counts[name][2] += bool(r.get("eos"))
        lines.append(f"**{name}** (coherent strict {bool(cs)}, degenerate {d.degenerate}, ended {r.get('eos')}):\n\n```\n{r['reply']}\n```\n")
head = [f"# Greedy replies to held-out prompts {lo}-{hi - 1}, side by side\n",
        "coherent strict / degenerate / ended, of %d: " % (hi - lo) + ", ".join(f"{n} {c[0]} / {c[1]} / {c[2]}" for n, c in counts.items()) + "\n"]
open(out, "w").write("\n".join(head + lines))
print(head[1])
