"""Write DeepSpeed ZeRO runs with DeepSpeed itself (run as a script by test_containers_scale.py).

    python tests/_deepspeed_writer.py BASE_DIR OUT_DIR

For each configuration, OUT_DIR/<stage>-<precision>/ is what ``engine.save_checkpoint`` writes
after steps 1 and 2 of training the BERT in BASE_DIR (``global_step1/``, ``global_step2/``,
``latest``, ``zero_to_fp32.py``), and OUT_DIR/<stage>-<precision>-expected/<tag>.safetensors is
DeepSpeed's own consolidation of that tag (its ``get_fp32_state_dict_from_zero_checkpoint``, trusted here): the
oracle the reader is checked against. A separate process: DeepSpeed sets up a process group.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIGS = {"zero2-fp32": (2, None), "zero3-bf16": (3, "bf16")}


def main(base_dir: Path, out_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import BertModel

    for name, (stage, precision) in CONFIGS.items():
        torch.manual_seed(0)
        model = BertModel.from_pretrained(base_dir)
        config: dict = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        if precision:
            config[precision] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        save = out_dir / name
        for _ in range(2):
            loss = engine(input_ids=torch.randint(0, 64, (4, 8))).last_hidden_state.float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            engine.save_checkpoint(save)
        expected = out_dir / f"{name}-expected"
        expected.mkdir()
        for tag in ("global_step1", "global_step2"):
            state = get_fp32_state_dict_from_zero_checkpoint(str(save), tag=tag)
            save_file({k: v.detach().contiguous() for k, v in state.items()}, expected / f"{tag}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
