#!/usr/bin/env bash
# Ablation ladder on the narrow-bump case: from the paper's settings to the tuned default, one change
# at a time (seed 0, same budget: 600 iterations, 256 trajectories, 20% of transitions).
# Usage: bash docs/analytic/ablation.sh [OUT_DIR]   (about 2 minutes per rung on one CPU core)
set -euo pipefail
out=${1:-docs/analytic/ablation}
run() {  # name, overrides...
  local name=$1; shift
  if [ ! -f "$out/$name/metrics.json" ]; then
    python -m fastnabla.train --preset gmm-narrow-bump-paper --out "$out/$name" output.overwrite=true \
      output.progress=false "$@" > /dev/null
  fi
  python - "$out/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {m['tv_to_target']:.3f} | {m['mean_log_reward']:.3f} | {m['energy_distance']:.3f} | {m['train_seconds']:.0f} |")
PY
}
echo "| rung | TV to target | mean log R | energy distance | train s |"
echo "|---|---|---|---|---|"
run 0-paper
run 1-eps-weights method.weight_forward=eps method.weight_reverse=eps
run 2-reference-fl-gamma1 method.weight_forward=eps method.weight_reverse=eps method.fl_model=pretrained method.gamma=one
run 3-cosine-lr method.weight_forward=eps method.weight_reverse=eps method.fl_model=pretrained method.gamma=one \
  optim.lr_schedule=cosine
run 4-pathwise-target method.weight_forward=eps method.weight_reverse=eps method.fl_model=pretrained method.gamma=one \
  optim.lr_schedule=cosine method.reverse_target=pathwise method.td_lambda=0.5
run 5-flow-not-in-forward method.weight_forward=eps method.weight_reverse=eps method.fl_model=pretrained \
  method.gamma=one optim.lr_schedule=cosine method.reverse_target=pathwise method.td_lambda=0.5 \
  method.forward_trains_flow=false
# Leave-one-out from the tuned config (gmm-narrow-bump): each run reverts one change to the paper's.
loo() {  # name, overrides... (layered on the tuned preset)
  local name=$1; shift
  if [ ! -f "$out/$name/metrics.json" ]; then
    python -m fastnabla.train --preset gmm-narrow-bump --out "$out/$name" output.overwrite=true \
      output.progress=false "$@" > /dev/null
  fi
  python - "$out/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {m['tv_to_target']:.3f} | {m['mean_log_reward']:.3f} | {m['energy_distance']:.3f} | {m['train_seconds']:.0f} |")
PY
}
echo
echo "| tuned, except | TV to target | mean log R | energy distance | train s |"
echo "|---|---|---|---|---|"
loo loo-none
loo loo-paper-weights method.weight_forward=one method.weight_reverse=one
loo loo-paper-fl method.fl_model=policy method.gamma=alpha_bar
loo loo-paper-reverse-target method.reverse_target=score
loo loo-forward-trains-flow method.forward_trains_flow=true
loo loo-constant-lr optim.lr_schedule=constant
loo loo-eps-flow-output-scale gmm.network.flow_output_scale=eps
loo loo-all-transitions train.transition_fraction=1.0
loo loo-paper-10pct-transitions train.transition_fraction=0.1
