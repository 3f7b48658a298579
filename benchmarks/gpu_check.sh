#!/usr/bin/env bash
# The GPU machine's checks and measurements in one call, printing as it goes (a stage that hangs still
# leaves the earlier output): the GPU tests, then benchmark rows of bench_train.py, ours and TRL in the
# same call. The GPU image lacks datasets, jsonschema, trl and pytest: pass a folder of their wheels
# (Python 3.12; benchmarks/README.md says how to download them) and the path of trl_anchor.py.
#
#   bash benchmarks/gpu_check.sh WHEELS ANCHOR STAGE...
#   STAGE: tests | profile | profile-compile | dpo-qwen | dpo-qwen-ours | dpo-qwen-compile | dpo-qwen-share | dpo-llama
#          | dpo-llama-ours | sft | sft-tokens | sft-llama-tokens | suite | suite-dpo | suite-llama | suite-sft | suite-precompute
#          | profile-steps | lora | host | sft-variants | suite-450 | tests-compile | suite-sft-dpo | sft-llama-head
#          | sft-llama-lt | suite-sft-both | profile-llama | sft-llama-prefetch | profile-qwen | graphs
#          | suite-qwen-graphs | tests-multi | fsdp-scaling | fsdp-dpo | fsdp-8b | varlen | profile-sft-llama
#          | sft-llama-knobs | sft-kernels | sft-qwen-kernel | sft-qwen-kernel-long | sft-swiglu
#          | sft-async | tests-step | async-llama | precompute-eager | working-llama | working-qwen | working-dpo
#          | tests-working | tests-adam | cpp-wrapper | fa4 | fa4-more | tests-fa4 | sft-llama-trl
#
# Run it unpiped: everything also goes to $OUT/gpu_check.log when the device sets OUT, and that file comes
# back even from a call cut off at its time limit (a pipe into tail is killed with it and returns nothing).
set -u
wheels=$1 anchor=$2
shift 2
if [ -n "${OUT:-}" ]; then exec > >(tee -a "$OUT/gpu_check.log") 2>&1; fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:$PWD/tests:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# flash-attn-4's CuTe DSL installed into /tmp/site: its packages folder, which a .pth adds in a real site dir;
# its compiled kernels cached on disk, so each run's process does not compile them again
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
if [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]; then PYTHONPATH="$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader
nproc; lscpu | grep -m1 "Model name" || true
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
bench() { timeout "$1" python3 benchmarks/bench_train.py --anchor "$anchor" "${@:2}"; echo "[exit $?]"; }
for stage in "$@"; do
  echo "== $stage ($(date -u +%T))"
  case $stage in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "not fsdp and not two" ;;
    profile) timeout 240 python3 benchmarks/profile_logps.py --shape qwen0.5b --pairs 16 --profile ;;
    dpo-qwen) bench 300 --mode dpo --shape qwen0.5b --bs 16 --steps 12 --warm 4 --also padding_free=false --also share_prompt=false ;;
    profile-compile) timeout 300 python3 benchmarks/profile_logps.py --shape qwen0.5b --pairs 16 --compile --layouts shared-prompt,packed ;;
    dpo-qwen-compile) bench 360 --mode dpo --shape qwen0.5b --bs 16 --steps 12 --warm 4 --also compile=false ;;
    dpo-qwen-ours) bench 150 --mode dpo --shape qwen0.5b --bs 16 --steps 12 --warm 4 --skip-trl ;;
    dpo-qwen-share) bench 300 --mode dpo --shape qwen0.5b --bs 16 --steps 12 --warm 4 --also share_prompt=false ;;
    dpo-llama) bench 300 --mode dpo --shape llama1b --bs 16 --steps 12 --warm 4 ;;
    dpo-llama-ours) bench 150 --mode dpo --shape llama1b --bs 16 --steps 12 --warm 4 --skip-trl ;;
    sft) bench 200 --mode sft --shape qwen0.5b --bs 8 --steps 16 --warm 4 ;;
    sft-tokens) bench 150 --mode sft --shape qwen0.5b --bs 18 --steps 12 --warm 4 --skip-trl ;;  # ~TRL packed's tokens/step
    sft-llama-tokens) bench 150 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl ;;
    suite) bench 570 --suite issue12 ;;
    suite-450) bench 450 --suite issue12 ;;
    suite-sft-dpo) bench 330 --suite issue12 --only 3,4,1 ;;
    tests-compile) timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "compiled or flash or segment or head_gradients or prefetched or fsdp2 or graphs or head_kernel or two_gib or swiglu or mixed_precision or master_adam or working_copies" ;;
    tests-step) timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "swiglu or mixed_precision or training_compiled or prefetched or training_with_cuda_graphs or lora_dpo or master_adam or working_copies" ;;
    tests-working) timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "master_adam or working_copies or training_compiled or mixed_precision or swiglu_in_the_compiled" ;;
    tests-fa4) timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "fa4 or without_a_wait" ;;
    sft-llama-trl) bench 200 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 ;;
    tests-adam) timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "master_adam" ;;
    host) timeout 60 python3 benchmarks/host_overhead.py; TORCH_BLAS_PREFER_CUBLASLT=1 timeout 60 python3 benchmarks/host_overhead.py ;;
    sft-variants) bench 200 --mode sft --shape qwen0.5b --bs 18 --steps 12 --warm 4 --skip-trl --also aligntrain.compiling.FUSE_LINEARS=false --also inductor.combo_kernels=true ;;
    sft-llama-head) bench 240 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --profile-step 10 \
                      --also aligntrain.modeling.HEAD_GRAD_IN_FORWARD=false ;;
    sft-llama-lt) TORCH_BLAS_PREFER_CUBLASLT=1 bench 120 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl ;;
    profile-llama) bench 120 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --profile-step 10
                   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench 120 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl
                   bench 120 --mode dpo --shape llama1b --bs 16 --steps 12 --warm 4 --skip-trl --profile-step 10 ;;
    profile-qwen) bench 150 --mode sft --shape qwen0.5b --bs 18 --steps 12 --warm 4 --skip-trl --profile-step 10 --cprofile-step 11 ;;
    graphs) bench 240 --mode sft --shape qwen0.5b --bs 18 --steps 12 --warm 4 --skip-trl --also cuda_graphs=true \
              --also cuda_graphs=true,cuda_graph_buckets=8
            bench 200 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also cuda_graphs=true ;;
    suite-qwen-graphs) bench 320 --suite issue12 --only 3 --also cuda_graphs=true,cuda_graph_buckets=8 ;;
    tests-multi) timeout 500 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "fsdp or two" ;;
    fsdp-scaling) timeout 590 python3 benchmarks/bench_fsdp.py --shape llama1b --mode sft --per-gpu 36 --gpus 1,2,4,8 --timeout 240 ;;
    fsdp-dpo) timeout 590 python3 benchmarks/bench_fsdp.py --shape llama1b --mode dpo --per-gpu 16 --gpus 1,2,4,8 --timeout 240 ;;
    fsdp-8b) timeout 590 python3 benchmarks/bench_fsdp.py --shape llama8b --mode sft --per-gpu 8 --gpus 4,8 --gc 1 --timeout 500 ;;
    sft-llama-prefetch) bench 150 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl \
                          --also aligntrain.trainer.PREFETCH=false ;;
    fa4) timeout 200 python3 benchmarks/varlen_kernels.py --shape llama1b --rows 36
         timeout 100 python3 benchmarks/varlen_kernels.py --shape qwen0.5b --rows 18
         timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/aligntrain/test_train_gpu.py -k "fa4"
         bench 300 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also model.flash_attention=fa2 \
           --also aligntrain.kernels.BLOCK=4096 --also model.flash_attention=fa2 ;;
    fa4-more) bench 200 --mode sft --shape qwen0.5b --bs 18 --steps 24 --warm 4 --skip-trl --also model.flash_attention=fa2 \
                --also aligntrain.kernels.BLOCK=4096 --also model.flash_attention=fa2
              bench 150 --mode dpo --shape llama1b --bs 16 --steps 12 --warm 4 --skip-trl --also model.flash_attention=fa2 ;;
    varlen) timeout 120 python3 benchmarks/varlen_kernels.py --shape llama1b --rows 36
            timeout 90 python3 benchmarks/varlen_kernels.py --shape qwen0.5b --rows 18 ;;
    profile-sft-llama) bench 150 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --profile-step 10 ;;
    sft-llama-knobs) bench 300 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also logprob_chunk_tokens=4096 \
                       --also logprob_chunk_tokens=8192 --also inductor.coordinate_descent_tuning=true ;;
    sft-kernels) bench 200 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also aligntrain.kernels.ENABLED=false \
                   --also inductor.max_pointwise_cat_inputs=1
                 bench 150 --mode sft --shape qwen0.5b --bs 18 --steps 12 --warm 4 --skip-trl --also aligntrain.kernels.ENABLED=false ;;
    sft-qwen-kernel) bench 240 --mode sft --shape qwen0.5b --bs 18 --steps 12 --warm 4 --skip-trl --profile-step 10 \
                       --also aligntrain.kernels.ENABLED=false --also aligntrain.kernels.ENABLED=true --also aligntrain.kernels.ENABLED=false ;;
    sft-qwen-kernel-long) bench 225 --mode sft --shape qwen0.5b --bs 18 --steps 40 --warm 4 --skip-trl --also aligntrain.kernels.ENABLED=false \
                            --also aligntrain.kernels.BLOCK=4096 --also aligntrain.kernels.ENABLED=false --also aligntrain.kernels.BLOCK=4096 ;;
    sft-swiglu) bench 240 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also aligntrain.compiling.FUSE_SWIGLU=false \
                  --also aligntrain.kernels.BLOCK=4096 --also aligntrain.compiling.FUSE_SWIGLU=false
                bench 150 --mode sft --shape qwen0.5b --bs 18 --steps 24 --warm 4 --skip-trl --also aligntrain.compiling.FUSE_SWIGLU=false \
                  --also aligntrain.kernels.BLOCK=4096 ;;
    sft-async) bench 240 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also aligntrain.trainer.ASYNC_METRICS=false \
                 --also aligntrain.compiling.FUSE_SWIGLU=false --also aligntrain.kernels.BLOCK=4096 --also aligntrain.trainer.ASYNC_METRICS=false
               bench 170 --mode sft --shape qwen0.5b --bs 18 --steps 24 --warm 4 --skip-trl --also aligntrain.trainer.ASYNC_METRICS=false \
                 --also aligntrain.kernels.BLOCK=4096 --also aligntrain.trainer.ASYNC_METRICS=false ;;
    async-llama) bench 170 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also aligntrain.trainer.ASYNC_METRICS=false \
                   --also aligntrain.kernels.BLOCK=4096 --also aligntrain.trainer.ASYNC_METRICS=false ;;
    working-llama) bench 200 --mode sft --shape llama1b --bs 36 --steps 12 --warm 4 --skip-trl --also working_weights=false \
                     --also aligntrain.kernels.BLOCK=4096 --also working_weights=false ;;
    working-qwen) bench 150 --mode sft --shape qwen0.5b --bs 18 --steps 24 --warm 4 --skip-trl --also working_weights=false \
                    --also aligntrain.kernels.BLOCK=4096 --also working_weights=false ;;
    working-dpo) bench 150 --mode dpo --shape llama1b --bs 16 --steps 12 --warm 4 --skip-trl --also working_weights=false ;;
    cpp-wrapper) bench 240 --mode sft --shape qwen0.5b --bs 18 --steps 24 --warm 4 --skip-trl --also inductor.cpp_wrapper=true \
                   --also aligntrain.kernels.BLOCK=4096 --also inductor.cpp_wrapper=true ;;
    precompute-eager) bench 150 --mode dpo --shape qwen0.5b --bs 16 --steps 12 --warm 4 --precompute --skip-trl --also compile=false ;;
    suite-sft-both) bench 300 --suite issue12 --only 4,3 ;;
    suite-dpo) bench 400 --suite issue12 --only 1,2 ;;
    suite-llama) bench 300 --suite issue12 --only 2 ;;
    suite-sft) bench 500 --suite issue12 --only 3,4,5 ;;
    suite-precompute) bench 260 --suite issue12 --only 5 ;;
    profile-steps) bench 120 --mode dpo --shape qwen0.5b --bs 16 --steps 9 --warm 4 --profile-step 6 --cprofile-step 7 --skip-trl
                   bench 100 --mode sft --shape qwen0.5b --bs 8 --steps 9 --warm 4 --profile-step 6 --cprofile-step 7 --skip-trl ;;
    lora) bench 300 --mode dpo --shape llama1b --bs 16 --steps 12 --warm 4 --lora r=16,alpha=32,targets=all-linear ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "== done ($(date -u +%T))"
