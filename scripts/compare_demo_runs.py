"""Compare two toy demo runs (`make demo` / recipes/grpo_toy.py out_dirs): every metric of every step and result.json,
except wall-clock figures (time/*, throughput, push and train seconds). Exit 1 on any difference.

    python scripts/compare_demo_runs.py runs/grpo_toy_before runs/grpo_toy
"""
import json, sys
a, b = sys.argv[1], sys.argv[2]
TIMING = ("time/", "rollout_tokens_per_s", "draft/push_seconds", "draft/train_seconds")
def rows(d): return [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
ra, rb = rows(a), rows(b)
diff, n = [], 0
for x, y in zip(ra, rb):
    for k in sorted(set(x) | set(y)):
        if k.startswith(TIMING) or k in TIMING: continue
        n += 1
        if x.get(k) != y.get(k): diff.append((x.get("step"), k, x.get(k), y.get(k)))
res_a, res_b = json.load(open(f"{a}/result.json")), json.load(open(f"{b}/result.json"))
def strip(r):  # wall-clock keys ("seconds" in the name) at any depth
    if isinstance(r, dict):
        return {k: strip(v) for k, v in r.items() if "seconds" not in k}
    return [strip(v) for v in r] if isinstance(r, list) else r
same_result = strip(res_a) == strip(res_b)
print(f"steps {len(ra)} vs {len(rb)}; {n} non-timing values compared; {len(diff)} differ; result.json equal: {same_result}")
for d in diff[:20]: print("  ", d)
sys.exit(0 if (not diff and same_result and len(ra) == len(rb)) else 1)
