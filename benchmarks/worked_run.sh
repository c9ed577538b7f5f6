#!/usr/bin/env bash
# Issue 24's restarted run (docs/plan-worked.md, amendment 4): the runbook's commands in order, in runs/worked/.
# Every stage resumes, or is skipped where its output is complete, so a session that ends mid-run reruns
# this script. From the repository root after `make setup`:
#
#     benchmarks/worked_run.sh                 # all stages in order
#     benchmarks/worked_run.sh labels heads    # some: labels | heads | choice | test | secondary | bench
#
# Logs go to runs/worked/logs/; each primary test's report to primary_test.json in its evaluate directory.
set -euo pipefail
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
W=runs/worked
PY=${PYTHON:-.venv/bin/python}
HEADS=(mlp hidden-mlp outcome-mlp outcome-hidden-mlp)
mkdir -p "$W/logs"

speccascade() { "$PY" -m speccascade.cli "$@"; }
say() { echo "[$(date -u +%FT%T)] $*" | tee -a "$W/logs/run.log" >&2; }
chosen() {  # a value of choice.json by its keys, e.g. chosen head spec
    "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))
for key in sys.argv[2:]: c = c[key]
print(c)' "$W/choice.json" "$@"
}
label() {  # the label evaluate gives the point of a rule's spelling (primary_test.py reads points by label)
    "$PY" -c 'import sys; from speccascade.evaluation.evaluate import plan_points
print(plan_points(sys.argv[1])[-1].point.label)' "$1"
}
report() {  # report FILE COMMAND...: COMMAND's stdout into FILE, unless FILE is already there
    local file=$1; shift
    [[ -s $file ]] || { "$@" > "$file.tmp" && mv "$file.tmp" "$file"; }
}

log_labels() {  # log_labels NAME FLAGS...: one trace directory of step 2, two processes of one core each
    local name=$1; shift
    say "labels $name"
    OMP_NUM_THREADS=1 speccascade log-traces --config configs/traces/worked-outcome.yaml --devices 2 --accelerator cpu \
        "$@" --out "$W/traces/$name" --resume >> "$W/logs/labels.log" 2>&1
}

stage_labels() {  # step 2; the validation problems before s2 (the order is free) so the curve can start early
    log_labels s0 --seed 0 --limit 128
    log_labels s1 --seed 1 --limit 128
    log_labels val --split test --seed 1 --limit 128
    log_labels s2 --seed 2 --limit 256
}

train_head() {  # train_head PROBLEMS NAME FLAGS...: one head of step 3 on the first 128, 256 or 512 problems
    local problems=$1 out="$W/heads/$1-$2" traces; shift 2
    case $problems in
        128) traces=$W/traces/s0 ;;
        256) traces=$W/traces/s0,$W/traces/s1 ;;
        512) traces=$W/traces/s0,$W/traces/s1,$W/traces/s2 ;;
    esac
    [[ -f $out/model.safetensors ]] && return
    say "head $(basename "$out")"
    speccascade train-deferral --config configs/train/outcome.yaml --traces "$traces" --out "$out" --overwrite "$@" \
        >> "$W/logs/heads.log" 2>&1
}

stage_heads() {  # step 3: the four input sets and the gap-label ablation, on 128, 256 and 512 problems
    local n h
    for n in 128 256 512; do
        for h in "${HEADS[@]}"; do train_head "$n" "$h" --head "$h"; done
        train_head "$n" outcome-hidden-mlp-gap --head outcome-hidden-mlp --gap-weight 1
    done
}

stage_choice() {  # step 4: the 512 heads' curve and knobs beside the six rules, then worked_choice.py
    local rules=(gain kl entropy fly diff tokenv3) every=("$W"/heads/*/) h
    for h in "${HEADS[@]}"; do rules+=("learned:$W/heads/512-$h"); done
    say "choice"
    report "$W/curve.json" "$PY" benchmarks/outcome_curve.py "$W/traces/val" "${rules[@]}"
    report "$W/knobs.json" "$PY" benchmarks/outcome_knobs.py "$W/traces/val" "${rules[@]}" --allowed 0 1 2 4 \
        --accepted 100 200 400 800 --versus kl
    report "$W/choice.json" "$PY" benchmarks/worked_choice.py "$W/knobs.json" "$W/curve.json"
    report "$W/learning-curve.json" "$PY" benchmarks/outcome_curve.py "$W/traces/val" gain kl fly \
        "${every[@]/#/learned:}"
}

evaluate() {  # evaluate OUT RULES FLAGS...: the test's settings with these rules, resumed, two processes of one
    # core each (amendment 10)
    local out=$1 rules=$2; shift 2
    say "evaluate $out"
    OMP_NUM_THREADS=1 speccascade evaluate --config configs/eval/worked-test.yaml --devices 2 --accelerator cpu \
        --rules "$rules" --out "$out" --resume "$@" >> "$W/logs/evaluate.log" 2>&1
}

training_free() {  # the labels of the four training-free rules at their knobs, comma-separated
    local name labels=()
    for name in gain kl entropy fly; do labels+=("$(label "$(chosen rules "$name")")"); done
    (IFS=,; echo "${labels[*]}")
}

stage_test() {  # step 5 and the primary test: the head against the best training-free rule that keeps the
    # target's quality on the test, else exact decoding (amendment 8)
    evaluate "$W/eval/test" "$(chosen test_rules)"
    report "$W/eval/test/primary_test.json" "$PY" benchmarks/primary_test.py "$W/eval/test" \
        "$(label "$(chosen head spec)")" "$(training_free)" --otherwise "$(label always)"
}

stage_secondary() {  # amendment 3: the head and the best rule at equal validation acceptance (256 problems)
    local head rule
    IFS=, read -r _ head rule <<< "$(chosen secondary_rules)"
    evaluate "$W/eval/secondary" "$(chosen secondary_rules)" --limit 256
    report "$W/eval/secondary/primary_test.json" "$PY" benchmarks/primary_test.py "$W/eval/secondary" \
        "$(label "$head")" "$(label "$rule")"
}

denominator() {  # the spelling of the primary test's denominator rule (amendment 8); nothing for exact decoding
    local name found
    found=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["denominator"])' "$W/eval/test/primary_test.json")
    for name in gain kl entropy fly; do
        [[ $(label "$(chosen rules "$name")") == "$found" ]] && chosen rules "$name"
    done
    return 0
}

stage_bench() {  # step 6: the primary test's two points (amendment 8) beside exact decoding, latency
    local rules
    rules=$(denominator)
    say "bench"
    speccascade bench --models smollm2-135m-worked --task worked-arithmetic --prompts 64 --batch-sizes 1 \
        --max-new-tokens 176 --no-transformers --rules "${rules:+$rules,}$(chosen head spec)" \
        --out "$W/bench" >> "$W/logs/bench.log" 2>&1
}

stages=("$@")
[[ $# -gt 0 ]] || stages=(labels heads choice test secondary bench)
for stage in "${stages[@]}"; do
    declare -F "stage_$stage" > /dev/null || { echo "error: no stage $stage (labels, heads, choice, test, secondary, bench)" >&2; exit 2; }
done
for stage in "${stages[@]}"; do "stage_$stage"; done
say "done: ${stages[*]}"
