#!/usr/bin/env bash
# The answers experiment's jobs, one CPU thread each (two run side by side), from the repository root:
#   plain S | start S | variant S NAME [extra train.py options]  (a NAME ending in warm adds --policy_weight 0)
set -x
cd "$(dirname "$0")/../.."; . .venv/bin/activate; export OMP_NUM_THREADS=1
R=results/answers; D=runs/v2; kind=$1; S=$2; v=$3; shift 3 2>/dev/null; extra="$*"
case $kind in
plain)
  [ -f $D/s$S-plain/latest ] || python train.py --preset answers --seed $S --max_steps 60 --eval_interval 60 \
    --save_interval 60 --threads 1 --out_dir $D/s$S-plain > $D/s$S-plain.log 2>&1 ;;
start)
  while [ ! -f $D/s$S-plain/latest ] || pgrep -f "out_dir $D/s$S-plain" > /dev/null; do sleep 20; done
  [ -f $R/s$S-start.json ] || python -m research.content --model $D/s$S-plain --limit 400 --reward_windows 8 \
    --out $R/s$S-start.json > $D/s$S-start.log 2>&1 ;;
variant)
  [[ $v == *warm ]] && extra="$extra --policy_weight 0"   # warm, nbdp05-warm, ...: the warm start alone
  while [ ! -f $D/s$S-plain/latest ] || pgrep -f "out_dir $D/s$S-plain" > /dev/null; do sleep 20; done
  [ -d $D/s$S-$v ] || cp -r $D/s$S-plain $D/s$S-$v
  python train.py --out_dir $D/s$S-$v --resume --max_steps 90 --n_thoughts 8 --forced_steps 10 --forced_decay 10 \
    --eval_interval 15 --eval_answers 32 --save_interval 15 --no-mixing_from_forced --threads 1 $extra \
    >> $D/s$S-$v.log 2>&1
  python -m research.content --model $D/s$S-$v --limit 400 --reward_windows 4 --out $R/s$S-$v.json \
    > $D/s$S-$v-eval.log 2>&1 ;;
esac
