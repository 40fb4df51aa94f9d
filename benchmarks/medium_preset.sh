#!/usr/bin/env bash
# The `medium` preset end to end, timed: harvest (>= 2M tokens of `docstrings` at `final`), train one
# TopK SAE, evaluate it on held-out docstrings and on the demo's held-out pydoc text, then run the
# demo and evaluate its final-site SAE on the same held-out docstrings, for a like-for-like table.
#   bash benchmarks/medium_preset.sh WORKDIR [RESULTS_DIR]      (about 50 min on 2 CPU cores)
#   SUMMARY_ONLY=1 bash benchmarks/medium_preset.sh WORKDIR [RESULTS_DIR]   (re-write the summary)
# Writes RESULTS_DIR/medium_preset.{json,md} (default benchmarks/results). Uses a cold docstrings cache
# in WORKDIR/cache, as on a fresh machine.
set -u
W=${1:?usage: medium_preset.sh WORKDIR [RESULTS_DIR]}
R=${2:-benchmarks/results}
mkdir -p "$W" "$R"
export CONCA_CACHE="$W/cache"
step() {  # step NAME COMMAND...: run, log, time
  local name=$1; shift
  local s=$(date +%s)
  "$@" > "$W/$name.log" 2>&1
  echo "$name $? $(( $(date +%s) - s ))" >> "$W/times.txt"
}
if [ -z "${SUMMARY_ONLY:-}" ]; then
  rm -f "$W/times.txt"
  step harvest conca harvest --preset medium --out "$W/acts"
  step train conca train --preset medium --activations "$W/acts" --out "$W/train"
  step eval_docstrings conca evaluate --dictionary "$W/train/dictionary" --text docstrings --tokens 16384 --out "$W/eval_docstrings"
  step eval_pydoc conca evaluate --dictionary "$W/train/dictionary" --text pydoc --tokens 3072 --out "$W/eval_pydoc"
  step demo conca demo --out "$W/demo"
  step eval_demo_docstrings conca evaluate --dictionary "$W/demo/train/final/topk" --text docstrings --tokens 16384 --out "$W/eval_demo_docstrings"
fi
python - "$W" "$R" <<'PY'
import json, sys, time
from pathlib import Path
w, r = Path(sys.argv[1]), Path(sys.argv[2])
times = {line.split()[0]: (int(line.split()[1]), int(line.split()[2])) for line in (w / "times.txt").read_text().splitlines()
         if len(line.split()) == 3}
manifest = json.loads((w / "acts" / "manifest.json").read_text())
positions = manifest["n_contexts_planned"] * manifest["ctx_len"]
keys = ("explained_variance", "ce_loss_recovered", "ce_loss_recovered_saelens", "dead_fraction", "l0")
def metrics(path):  # conca evaluate's metrics.json; None for a step that was not run
    if not Path(path).exists():
        return {k: None for k in keys}
    m = json.loads(Path(path).read_text())["metrics"]
    return {k: m.get(k) for k in keys}
demo = json.loads((w / "demo" / "metrics.json").read_text())["sites"]["final"]
table = {"medium TopK on held-out docstrings": metrics(w / "eval_docstrings" / "metrics.json"),
         "medium TopK on held-out pydoc (the demo's eval text)": metrics(w / "eval_pydoc" / "metrics.json"),
         "demo TopK on held-out pydoc (its own report)": {k: demo.get(k) for k in keys},
         "demo TopK on held-out docstrings": metrics(w / "eval_demo_docstrings" / "metrics.json")}
train = json.loads((w / "train" / "metrics.json").read_text())
out = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": times, "stored_tokens": manifest["n_tokens"],
       "positions": positions, "harvest_tokens_per_s_wall": positions / times["harvest"][1],
       "harvest_plus_train_s": times["harvest"][1] + times["train"][1], "train_tokens_per_s": train.get("tokens_per_s"),
       "manifest_extra": manifest["extra"], "metrics": table}
(r / "medium_preset.json").write_text(json.dumps(out, indent=2) + "\n")
lines = ["# medium_preset", "", f"{out['time']} · `bash benchmarks/medium_preset.sh WORKDIR`", "",
         "| step | exit | wall s |", "|---|---|---|"] + [f"| {k} | {v[0]} | {v[1]} |" for k, v in times.items()]
lines += ["", f"- stored {manifest['n_tokens']:,} tokens ({positions:,} positions incl. BOS) at `final`; harvest wall "
          f"{times['harvest'][1]} s = {out['harvest_tokens_per_s_wall']:,.0f} positions/s including model load, "
          f"corpus build (cold cache) and compiling; harvest + train {out['harvest_plus_train_s']} s.",
          f"- training: {train.get('tokens_per_s', 0):,.0f} tokens/s", "",
          "| dictionary, evaluated on | EV | CE-loss recovered | CE rec. (SAELens def.) | dead | L0 |", "|---|---|---|---|---|---|"]
fmt = lambda v: "" if v is None else f"{v:.4g}"
lines += [f"| {name} | " + " | ".join(fmt(m[k]) for k in keys) + " |" for name, m in table.items()]
(r / "medium_preset.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
