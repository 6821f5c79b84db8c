#!/bin/sh
# The training and decode benchmarks on a CUDA GPU, side by side with the peers that run there
# (litgpt, llama.cpp and ONNX Runtime are measured on the CPU: see README.md).
#   sh bench/gpu.sh            # from the project root; ../shared/data/tinyshakespeare.txt beside it
set -e
export PYTHONUNBUFFERED=1
# nanoGPT's shape: far too small to fill a GPU, so this measures per-step overhead
python bench/train_peers.py --device cuda --shape nanogpt --trainers semilla,semilla-fp32,hf,hf-bf16 --rounds 3 --steps 300 --threads 4
# GPT-2 small's body, block 1024, batch 16: bfloat16 autocast in both
python bench/train_peers.py --device cuda --shape gpt2 --trainers semilla,hf-bf16 --rounds 3 --steps 50 --threads 4
# single-stream greedy decoding, 256 tokens
python bench/inference_compare.py --device cuda --shape 10m --repeats 3
python bench/inference_compare.py --device cuda --shape 50m --dtype bfloat16 --repeats 3
