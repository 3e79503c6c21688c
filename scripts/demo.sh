#!/usr/bin/env bash
# The whole recipe on the tiny preset, on CPU, in one command (set-up included: scripts/setup.sh is idempotent):
# build ToyWorld, warm up each tower (and the resampler's slots), align, fine-tune, then score the held-out split.
#   bash scripts/demo.sh                       # DATA=data/toyworld OUT=out/demo
#   DATA=/tmp/tw OUT=/tmp/demo bash scripts/demo.sh
#   DPO=1 bash scripts/demo.sh                 # + the RLAIF-V DPO stage (pairs, DPO, evals: ~30 min more)
#   SPEAK=1 bash scripts/demo.sh               # + speech output: spoken-answer data, the talker, its measurement
# Re-running continues where it stopped (every stage runs with --resume auto); rm -rf "$OUT" to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
DATA=${DATA:-data/toyworld}
OUT=${OUT:-out/demo}
# On 2-3 cores DataLoader worker processes only compete with training for the cores: without them the warm-ups side
# by side, align and SFT run 6-12% faster, with the same losses (each sample is drawn from its index; stop 31)
WORKERS=$(( $(nproc) > 3 ? 2 : 0 ))
COMMON=(--swanlab_mode "${SWANLAB_MODE:-offline}" --resume auto --log_every 25 --num_workers "$WORKERS")
mkdir -p "$OUT/logs"
TIMES="$OUT/logs/times.txt"  # one line per stage (a file: the two warm-up sides below run in subshells)
: > "$TIMES"
# the yardstick for the stage times below: "2 CPU cores" differ by 2x from one machine to the next
MACHINE=$(python benchmarks/machine_speed.py)
echo "$MACHINE"

run() {  # run NAME CMD...: log to $OUT/logs/NAME.log, print the last progress line and the time it took
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  if ! "$@" > "$OUT/logs/$name.log" 2>&1; then
    tail -n 30 "$OUT/logs/$name.log"
    echo "$name failed (full log: $OUT/logs/$name.log)"
    exit 1
  fi
  tr '\r' '\n' < "$OUT/logs/$name.log" | grep -E "^step " | tail -n 1 || true
  printf '%-8s %5d s\n' "$name" $((SECONDS - start)) >> "$TIMES"
}

[ -f "$DATA/test.jsonl" ] || run data python dataset/build_toyworld.py --out "$DATA"
# The warm-ups of the image side (vision tower, then the resampler's slots) and of the sound + language side (audio
# tower, the LLM) train different parts: they run side by side on half the cores each and meet at align (--graft).
# Stop 31 measured the five at 985 s side by side, 1,275 one after the other (docs/experiments.md). The audio
# projector's warm-up (listen) needs only the audio tower: it runs once the image side is done, beside the text
# warm-up (which reads stand-ins, not the projector), so that both sides end together (stop 35).
export OMP_NUM_THREADS=$(( $(nproc) > 3 ? $(nproc) / 2 : 1 ))
start=$SECONDS
( run vision python train_pretrain_omni.py --stage vision --data "$DATA/pretrain.jsonl" "$DATA/sft.jsonl" \
    --out "$OUT/vision" "${COMMON[@]}"
  run slots python train_pretrain_omni.py --stage slots --data "$DATA/pretrain.jsonl" "$DATA/sft.jsonl" \
    --init "$OUT/vision" --out "$OUT/slots" "${COMMON[@]}" ) &
SIDES=($!)
trap 'for p in "${SIDES[@]}"; do kill $p $(pgrep -P $p) 2>/dev/null; done; true' EXIT  # one failed: stop the rest
run audio python train_pretrain_omni.py --stage audio --data "$DATA/pretrain.jsonl" "$DATA/sft.jsonl" \
  --out "$OUT/audio" "${COMMON[@]}"
run text python train_pretrain_omni.py --stage text --data "$DATA/pretrain.jsonl" "$DATA/sft.jsonl" \
  --init "$OUT/audio" --out "$OUT/text" "${COMMON[@]}" &
SIDES+=($!)
wait "${SIDES[0]}" || { echo "the image side's warm-ups failed"; exit 1; }
run listen python train_pretrain_omni.py --stage listen --data "$DATA/pretrain.jsonl" "$DATA/sft.jsonl" \
  --init "$OUT/audio" --out "$OUT/listen" "${COMMON[@]}"
wait "${SIDES[1]}" || { echo "the text warm-up failed"; exit 1; }
trap - EXIT
printf '%-8s %5d s\n' "(side by side: vision + slots + listen | audio + text)" $((SECONDS - start)) >> "$TIMES"
unset OMP_NUM_THREADS
run align python train_pretrain_omni.py --stage align --data "$DATA/pretrain.jsonl" \
  --init "$OUT/text" --graft vision,resampler="$OUT/slots" audio_projector="$OUT/listen" --out "$OUT/align" \
  "${COMMON[@]}"
# SFT keeps the warmed-up audio tower frozen: trained on SFT's 600 clips it undoes the spelling (asr 0.73 vs 0.80);
# the LLM at a third of the lr: at 3e-4 it forgets how to read the spelled speech (asr 0.76 vs 0.84, README)
run sft python train_sft_omni.py --data "$DATA/sft.jsonl" --init "$OUT/align" --out "$OUT/sft" \
  --train vision,llm,projectors --lr_for llm.=1e-4 "${COMMON[@]}"
run eval python eval_omni.py --ckpt "$OUT/sft" --bench "$DATA/test.jsonl" --out "$OUT/results.json"

echo
sed -n '/^task/,/^captions/p' "$OUT/logs/eval.log"
if [ "${DPO:-0}" = 1 ]; then  # RLAIF-V: the SFT model's own captions of fresh scenes, ranked by the claim judge, then DPO
  HELDOUT=${DATA}_seed7 FRESH=${DATA}_seed11  # new scenes: 1,692 held-out captions to score; prompts for the pairs
  [ -f "$HELDOUT/captions_heldout.jsonl" ] || run heldout python benchmarks/heldout_captions.py --avoid "$DATA" \
    --seed 7 --out "$HELDOUT"
  [ -f "$FRESH/captions_fresh.jsonl" ] || run fresh python benchmarks/heldout_captions.py \
    --avoid "$HELDOUT/captions_heldout.jsonl" --seed 11 --splits pretrain,sft --out "$FRESH" --name captions_fresh.jsonl
  [ -f "$OUT/dpo_pairs.jsonl" ] || run pairs python dataset/build_preferences.py --ckpt "$OUT/sft" \
    --data "$FRESH/captions_fresh.jsonl" --tasks caption --out "$OUT/dpo_pairs.jsonl"
  # misreadings are most false claims: the vision side trains too; beta 0.01 (README, "DPO against hallucination")
  run dpo python train_dpo_omni.py --init "$OUT/sft" --data "$OUT/dpo_pairs.jsonl" --train vision,resampler,llm \
    --beta 0.01 --sft_weight 1 --out "$OUT/dpo" "${COMMON[@]}"
  mkdir -p "$OUT/dpo_eval"
  BENCHES=("$DATA/test.jsonl" "$HELDOUT/test.jsonl" "$FRESH/test.jsonl" "$HELDOUT/captions_heldout.jsonl")
  for model in sft dpo; do  # 180 samples per task on three test splits (one answer = 0.6 points), and the captions
    for i in "${!BENCHES[@]}"; do  # (the SFT model on the demo's split: the eval stage above, results.samples.jsonl)
      [ "$model$i" = sft0 ] || [ -f "$OUT/dpo_eval/${model}_$i.json" ] || run "eval_${model}_$i" python eval_omni.py \
        --ckpt "$OUT/$model" --bench "${BENCHES[$i]}" --out "$OUT/dpo_eval/${model}_$i.json"
    done
  done
  echo "after DPO, test splits (${BENCHES[*]:0:3}):"
  python benchmarks/compare_results.py --before "$OUT/results.samples.jsonl" "$OUT"/dpo_eval/sft_{1,2}.samples.jsonl \
    --after "$OUT"/dpo_eval/dpo_{0,1,2}.samples.jsonl | tee "$OUT/dpo_eval/test_splits.txt"
  echo "after DPO, held-out captions (${BENCHES[3]}):"
  python benchmarks/compare_results.py --before "$OUT/dpo_eval/sft_3.samples.jsonl" \
    --after "$OUT/dpo_eval/dpo_3.samples.jsonl" | tee "$OUT/dpo_eval/heldout_captions.txt"
fi
if [ "${SPEAK:-0}" = 1 ]; then  # speech output: ToyWorld with spoken answers + codec, a talker on the frozen SFT LLM
  SPEECH_DATA=${SPEECH_DATA:-${DATA}_speak}
  [ -f "$SPEECH_DATA/codec/codec.json" ] || run speak_data python dataset/build_toyworld.py --out "$SPEECH_DATA" --speak
  run talker python train_sft_omni.py --init "$OUT/sft" --train talker --speech_weight 1 --epochs 8 \
    --data "$SPEECH_DATA/pretrain.jsonl" "$SPEECH_DATA/sft.jsonl" \
    --tasks color,shape,count,position,audio_qa,asr,read_aloud --out "$OUT/talker" "${COMMON[@]}"
  [ -f "$OUT/speech_judge/judge.pt" ] || run judge python benchmarks/bench_speech.py judge --data "$SPEECH_DATA" \
    --out "$OUT/speech_judge"
  run bench_speech python benchmarks/bench_speech.py measure --data "$SPEECH_DATA" --judge "$OUT/speech_judge" \
    --ckpt "$OUT/talker" --out "$OUT/speech_results.json"
  cat "$OUT/speech_results.json"
fi
echo
echo "time per stage:"
sed 's/^/  /' "$TIMES"
echo "total: $SECONDS s on this $MACHINE"
echo "checkpoint: $OUT/sft   (chat: python eval_omni.py --ckpt $OUT/sft --image img.png \"What is in the picture?\")"
echo "results:    $OUT/results.json, per-sample predictions in $OUT/results.samples.jsonl"
