"""Pick the quickstart's OrthoReg lambda from the sweep (recipes/mini-lambda-sweep.yaml), on Val only.

    python scripts/choose_mini_lambda.py [runs/mini-lambda-sweep]

For each lambda: the merged model's mean Val accuracy at the alpha that the protocol's addition search selected on
Val. That absolute accuracy decides: normalized accuracy is not comparable across lambdas, because its denominator
(each run's own single-task fine-tuned accuracy) itself changes with lambda - a lambda that hurts fine-tuning
raises it. Both are printed; test figures are shown for information and play no part in the choice.
"""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mini-lambda-sweep")
rows = []
for folder in sorted(root.iterdir()):
    f = folder / "addition.json"
    if not f.exists():
        continue
    res = json.loads(f.read_text())
    at = next(p for p in res["curve"] if p["alpha"] == res["alpha"])
    lam = 0.0 if folder.name == "lam-0" else float(folder.name.split("-", 1)[1])
    rows.append((lam, at["mean_val_acc"], at["mean_val_norm_acc"], res["alpha"], res["abs_acc"], res["norm_acc"]))
if not rows:
    raise SystemExit(f"no addition.json under {root}; run `tvtool run recipes/mini-lambda-sweep.yaml` first")
rows.sort()
print(f"{'lambda':>8} {'Val acc':>8} {'Val norm.acc':>13} {'alpha':>6} {'test Abs.Acc':>13} {'test Norm.Acc':>14}")
for lam, val, val_norm, alpha, abs_acc, norm_acc in rows:
    print(f"{lam:>8g} {100 * val:>8.2f} {100 * val_norm:>13.2f} {alpha:>6.2f} {100 * abs_acc:>13.2f} "
          f"{100 * norm_acc:>14.2f}")
best = max((r for r in rows if r[0] > 0), key=lambda r: r[1])
print(f"chosen lambda (highest merged-model Val accuracy among lambda > 0): {best[0]:g}")
