"""Random-weight Llama checkpoints of real shapes, written by transformers (the GPU machines have
no model hub): SmolLM2-135M and Llama-3.2-1B. Usage: make_checkpoints.py OUT_DIR TOKENIZER_JSON."""
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m-shaped": (
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
             tie_word_embeddings=True, max_position_embeddings=8192),
        torch.float32,
    ),
    "llama3.2-1b-shaped": (
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
             tie_word_embeddings=True, max_position_embeddings=131072, head_dim=64,
             rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192)),
        torch.bfloat16,
    ),
}

out, tokenizer = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
for name, (shape, dtype) in SHAPES.items():
    path = os.path.join(out, name)
    if os.path.exists(os.path.join(path, "config.json")):
        continue
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.json"))
    print(name, sum(p.numel() for p in model.parameters()), "parameters", dtype, flush=True)
    del model
