#!/usr/bin/env bash
# Issue 14 on a lent GPU (the device tool): 30-epoch recipe fine-tunes of the best searched policy
# and the best rule, the top-4 export on the TPE seed-0 study and an lr-0.01 ablation, run in
# parallel from the repository root; logs in $OUT, runs in $WORK (default /tmp/gpuwork).
#
# It reads an ignored folder devcarry/ that travels with the call (carry: ["devcarry"]):
#   devcarry/whl/     the autoprune wheel (pip wheel --no-deps .) and, for the device's Python 3.12,
#                     the dependencies its image lacks (optuna, alembic, sqlalchemy, mako, colorlog,
#                     cmaes, gymnasium, farama-notifications, stable-baselines3, torch-pruning,
#                     optuna-dashboard, bottle; pip download --no-deps --python-version 3.12 ...)
#   devcarry/shared/  models/resnet56_cifar10.{pt,json} and data/cifar10-jpeg.tar.gz from ../shared
#   devcarry/r56.db   a copy of the search storage (sqlite3 .backup) holding resnet56-...-tpe-s0
# JOBS picks the runs (default "best rule topk lr01"); each resumes from its last epoch when the machine is
# still warm, so a run cut by BUDGET goes on with the same command.
# Session 13 ran `BUDGET=515 bash benchmarks/finetune_on_gpu.sh` on an H200, then resumed the best
# run alone on the still-warm machine (JOBS=best). Session 21 ran `JOBS="rule hint1" BUDGET=535` and
# then the same with BUDGET=220 to finish epoch 30 (17-21 s per epoch each, 8 loader workers each).
# Issue 24 (aggressive budgets after fine-tuning, 2 fine-tune seeds each): JOBS="r03 r05s1" runs six
# recipes at once: ResNet-56 at 0.3flops, the best searched policy and the best rule of the held-out
# search (search-resnet56-0.3flops-ce-heldout.json; the best epoch picked on held-out images, test
# on the other 9,000), fine-tune seeds 0 and 1; and at 0.5flops seed 1 of the pair seed 0 measured.
# Issue 25 (the latency pair after fine-tuning): JOBS=lat fine-tunes, seeds 0 and 1, the stage-space latency
# search's best ResNet-56 policy at 0.75latency (ONNX Runtime, batch 64, the in-context table) and the best
# rule filled to its predicted latency (benchmarks/results/rule-at-latency-resnet56-ort64-ctxs-pair.json,
# written by benchmarks/rule_at_latency.py --pair-out; QLAT=<another pair file> to fine-tune another).
# JOBS=lat06 does the same for the 0.6latency pair of the block grid: the DDPG seed its proxy ranks first of three
# and the best rule at its measured latency (benchmarks/results/rule-at-latency-resnet56-ort64-06-blk-ddpg-pair.json,
# written by rule_at_latency.py --pair-from from the three seeds' comparisons), in run folders labelled lat06.
# Local dry run: LOCAL=1 EPOCHS=0.02 SELECT=0.01 SHORT=0.01 DEVICE=cpu OUT=/tmp/gout bash benchmarks/finetune_on_gpu.sh
# On this CPU (bfloat16 where it is native, about 2 h for a pruned ResNet-56's 30 epochs on one core),
# two runs at a time, one thread each, resumable across sessions (WORK kept):
#   LOCAL=1 DEVICE=cpu PARALLEL=2 THREADS=1 BUDGET=86400 WORK=bench-state OUT=logs/ft JOBS=lat bash benchmarks/finetune_on_gpu.sh
# Issue 24's predictor study: JOBS=pred runs benchmarks/predictors.py in SHARDS processes (default 2) over the
# 0.3flops policies of both searches (rules and each seed's best; the r03 runs of fine-tune seed 0 are reused).
# Issue 24's GPU throughput: JOBS="thr ..." times fine-tune steps of the dense and 0.3flops ResNet-56, the JPEG
# loader against the in-memory path, eager and compiled, and reading the teacher's stored logits
# (benchmarks/finetune_throughput.py --device cuda), alone, before the fine-tunes load the GPU.
# Issue 25's CUDA timings: JOBS="cudalat ..." first times the 0.5flops policies with eager and compile at batch 256
# (benchmarks/runtime_speedup.py --device cuda), alone, then the fine-tune jobs start.
# Issue 26's 2:4 timings: JOBS="nm24 ..." times ResNet-18 cut to 2:4, layer by layer and whole, as cuDNN convs, as
# dense GEMMs and with PyTorch's semi-structured sparse kernels (benchmarks/semi_structured_latency.py), alone.
# COMPILE=1 trains the recipe runs through torch.compile (on this CPU, two 0.3flops ResNet-56 runs side by
# side: 2.2-2.3 steps/s each against 1.9-2.0 eager, after about 2 minutes of compiling; short
# benchmarks under load did not separate them); a run may resume with or without it.
set -u
REPO=$(pwd)
C=$REPO/devcarry
EPOCHS=${EPOCHS:-30}; SELECT=${SELECT:-2}; SHORT=${SHORT:-1,3}; DEVICE=${DEVICE:-cuda}; BUDGET=${BUDGET:-530}
THREADS=${THREADS:-2}; PARALLEL=${PARALLEL:-99}; SHARDS=${SHARDS:-2}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
if [ -z "${LOCAL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $C/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PY=python3
  nvidia-smi --query-gpu=name,memory.total --format=csv
else
  PY=${PY:-$REPO/.venv/bin/python}
fi
[ -z "${LOCAL:-}" ] && export AUTOPRUNE_SHARED=$C/shared  # a local run reads ../shared
W=${WORK:-/tmp/gpuwork}; mkdir -p $W $OUT
$PY - <<'EOF' || exit 1
import torch, sys; sys.path.insert(0, '.')
from benchmarks.common import cifar_dir
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'data', cifar_dir())
EOF
Q=benchmarks/results/quality-resnet56-portfolio.json
Q03=benchmarks/results/search-resnet56-0.3flops-ce-heldout.json
Q03T=benchmarks/results/search-resnet56-0.3flops-ce-train.json
QLAT=${QLAT:-benchmarks/results/rule-at-latency-resnet56-ort64-ctxs-pair.json}
QLAT06=benchmarks/results/rule-at-latency-resnet56-ort64-06-blk-ddpg-pair.json
T0=$(date +%s)
slot() { while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 10; done; }  # at most PARALLEL runs at once
recipe() {  # recipe LOG ARGS...: one finetune_recipe run in the background, resumed if its checkpoint is there
  local log=$1; shift
  slot
  timeout $BUDGET $PY -m benchmarks.finetune_recipe --quality $Q --epochs $EPOCHS --device $DEVICE --work $W/ft \
    --threads $THREADS ${COMPILE:+--compile} "$@" \
    >> $OUT/$log.log 2>&1 &
}
for job in ${JOBS:-best rule topk lr01}; do
  case $job in
    best)  recipe best --which best --out $W/ft/recipe-best.json ;;
    rule)  recipe rule --which rule --out $W/ft/recipe-rule.json ;;
    lr01)  recipe lr01 --which best --lr 0.01 --label lr01 --out $W/ft/recipe-best-lr01.json ;;
    hint1) recipe hint1 --which best --hint 1 --label hint1 --out $W/ft/recipe-best-hint1.json ;;
    r03)   for fs in 0 1; do for w in best rule; do  # seed outermost: with PARALLEL=2 a pair runs together
             recipe r03-$w-fs$fs --quality $Q03 --which $w --seed $fs --out $W/ft/r03-$w-fs$fs.json
           done; done ;;
    r05s1) for w in best rule; do recipe r05-$w-fs1 --which $w --seed 1 --out $W/ft/r05-$w-fs1.json; done ;;
    lat)   for fs in 0 1; do for w in best rule; do
             recipe lat-$w-fs$fs --quality $QLAT --which $w --seed $fs --out $W/ft/lat-$w-fs$fs.json
           done; done ;;
    lat06) for fs in 0 1; do for w in best rule; do
             recipe lat06-$w-fs$fs --quality $QLAT06 --which $w --seed $fs --label lat06 --out $W/ft/lat06-$w-fs$fs.json
           done; done ;;
    pred)  for i in $(seq 0 $(( SHARDS - 1 ))); do  # the predictor study at 0.3flops (benchmarks/predictors.py)
             slot
             timeout $BUDGET $PY -m benchmarks.predictors --quality $Q03,$Q03T --work $W/ft --epochs $EPOCHS \
               --short $SHORT --device $DEVICE --threads $THREADS --shard $i/$SHARDS ${COMPILE:+--compile} \
               --out $W/ft/predictors-resnet56-0.3flops.json >> $OUT/pred-$i.log 2>&1 &
           done ;;
    thr)   # issue 24 on a GPU: epoch time of the dense and 0.3flops ResNet-56 (aim: 2 s dense on an H200); alone
      timeout $BUDGET $PY -m benchmarks.finetune_throughput --model resnet56 --device $DEVICE --steps 100 \
        --warmup 10 --policies dense,0.3flops --paths jpeg,tensor --compile --stored-logits --loader-batches 50 \
        --threads $THREADS --out $W/finetune-throughput-cuda.json >> $OUT/thr.log 2>&1 ;;
    cudalat)  # issue 25 on a GPU: the 0.5flops rules and best searched policies timed against dense with eager
              # and compile at batch 256; in the foreground, alone, before the fine-tunes load the GPU
      timeout $BUDGET $PY -m benchmarks.runtime_speedup --models resnet56,resnet18 --runtimes eager,compile \
        --batches 256 --round-to '' --pairs 30 --device $DEVICE --out $W/runtime-speedup-cuda.json \
        --quality resnet56=$Q,resnet18=benchmarks/results/quality-resnet18-lsq.json >> $OUT/cudalat.log 2>&1 ;;
    nm24)  # issue 26 on a GPU: ResNet-18 at 2:4, per layer and end to end, dense against sparse kernels; alone
      timeout $BUDGET $PY -m benchmarks.semi_structured_latency --model resnet18 --batch 256 --device $DEVICE \
        --out $W/semi-structured-resnet18.json >> $OUT/nm24.log 2>&1 ;;
    topk)
      mkdir -p $W/topk
      (cd /tmp && timeout $BUDGET env PYTHONPATH=${PYTHONPATH:-$REPO} $PY -m autoprune.cli export \
        resnet56-0.5flops-l1-lsq-tpe-s0 --storage sqlite:///$C/r56.db -o $W/topk/policy.json \
        --weights $C/shared/models/resnet56_cifar10.pt --data-dir $HOME/.cache/autoprune-data/cifar10-jpeg \
        --model-dir $W/topk/model --finetune-epochs $EPOCHS --top-k 4 --select-epochs $SELECT --select-workers 4 \
        --device $DEVICE) >> $OUT/topk.log 2>&1 & ;;
    *) echo "unknown job $job (best, rule, lr01, hint1, topk, r03, r05s1, lat, lat06, pred, thr, cudalat, nm24)"; exit 2 ;;
  esac
done
while [ -n "$(jobs -r)" ]; do
  sleep 30; echo "t+$(( $(date +%s) - T0 ))s"; for f in $(find $W -name finetune.csv); do echo "  $f: $(tail -n 1 $f)"; done
done
wait
echo "all done at t+$(( $(date +%s) - T0 ))s"
(cd $W && find . -name '*.csv' -o -name '*.json' | xargs tail -n +1 > $OUT/results.txt 2>/dev/null)
[ -z "${LOCAL:-}" ] && tar -czf $OUT/gpuwork.tar.gz --exclude='*.onnx' --exclude='*.pt' -C $W .  # what comes back from the device
for f in $OUT/*.log; do echo "== $f"; tail -n 5 $f; done
