"""Write a shapes-only LLaMA run for `dora-analyze --dry-run`: base.shapes.json + run/checkpoint-N/.

Defaults are LLaMA-2-70B's (80 layers, hidden 8192, MLP 28672, 8 key/value heads of 128,
vocab 32000), bf16, 20 checkpoints. No weights are written: a few KB of JSON.

Usage:
    python benchmarks/shapes_llama.py /tmp/llama70b
    dora-analyze --dry-run /tmp/llama70b/base.shapes.json /tmp/llama70b/run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def llama_shapes(layers: int, hidden: int, mlp: int, kv: int, vocab: int) -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [hidden, hidden],
            p + "self_attn.k_proj.weight": [kv, hidden],
            p + "self_attn.v_proj.weight": [kv, hidden],
            p + "self_attn.o_proj.weight": [hidden, hidden],
            p + "mlp.gate_proj.weight": [mlp, hidden],
            p + "mlp.up_proj.weight": [mlp, hidden],
            p + "mlp.down_proj.weight": [hidden, mlp],
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
        }
    return shapes | {"model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}


def write(
    out: Path, *, layers: int = 80, hidden: int = 8192, mlp: int = 28672, kv: int = 1024, vocab: int = 32000, checkpoints: int = 20
) -> None:
    text = json.dumps({"dtype": "bfloat16", "tensors": llama_shapes(layers, hidden, mlp, kv, vocab)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "base.shapes.json").write_text(text)
    for n in range(1, checkpoints + 1):
        step = out / "run" / f"checkpoint-{100 * n}"
        step.mkdir(parents=True, exist_ok=True)
        (step / "model.shapes.json").write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--mlp", type=int, default=28672)
    p.add_argument("--kv", type=int, default=1024, help="rows of k_proj / v_proj: key/value heads x head dim (8 x 128)")
    p.add_argument("--checkpoints", type=int, default=20)
    a = p.parse_args()
    write(a.out, layers=a.layers, hidden=a.hidden, mlp=a.mlp, kv=a.kv, checkpoints=a.checkpoints)
    print(f"wrote {a.out}/base.shapes.json and {a.checkpoints} checkpoints under {a.out}/run")


if __name__ == "__main__":
    main()
