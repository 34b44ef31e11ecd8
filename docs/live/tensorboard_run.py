"""The run behind docs/live.md: transformers.Trainer + DecompositionCallback, read back from TensorBoard.

PEFT DoRA (r = 8, alpha = 16, query and value) on the bundled all-MiniLM-L6-v2 with a fresh
2-class head, the built-in synthetic sentences, batch 16, ``STEPS`` steps, a checkpoint every
15 steps and a measurement every 5, ``report_to=["tensorboard"]`` (nothing leaves the machine).
Then the event files are read back with TensorBoard's ``EventAccumulator``: the script prints
every ``decomposition`` tag, a Markdown table of the pooled scalars at each step, and draws
them to ``docs/live/scalars.png``.

Usage (from the repository root; needs ``pip install tensorboard``)::

    .venv/bin/python docs/live/tensorboard_run.py --out runs/live-tb
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY, MEASURE_EVERY = 60, 15, 5


class Sentences(torch.utils.data.Dataset):
    """The built-in synthetic task, tokenized once, each example trimmed to its own length."""

    def __init__(self, model_path: Path, n: int) -> None:
        from dora_analysis.train.data import synthetic_task, tokenize
        from dora_analysis.train.model import load_tokenizer

        self.data = tokenize(synthetic_task(n, seed=0), load_tokenizer(model_path), 128)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.data.batch(torch.tensor([i]))  # the collator pads each batch again


def train(out: Path) -> float:
    import peft
    import transformers

    from dora_analysis.integrations.hf import DecompositionCallback
    from dora_analysis.train.model import default_model_path

    model_path = default_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    config = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(model, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    data = [{k: v[0] for k, v in row.items()} for row in Sentences(model_path, STEPS * 16)]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, save_only_model=True, per_device_train_batch_size=16,
        learning_rate=1e-3, logging_steps=MEASURE_EVERY, report_to=["tensorboard"],
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        callbacks=[DecompositionCallback(every_n_steps=MEASURE_EVERY)],
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def read_back(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under ``logdir``: (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(logdir.rglob("events.out.tfevents.*"))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in events:
        acc = EventAccumulator(str(file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/live-tb"), help="the Trainer's output_dir (default runs/live-tb)")
    p.add_argument("--png", type=Path, default=HERE / "scalars.png")
    args = p.parse_args()
    seconds = train(args.out)
    scalars = read_back(args.out / "runs")  # the Trainer's default: OUTPUT_DIR/runs/<date>_<host>
    tags = sorted(t for t in scalars if "decomposition/" in t)
    print(f"# trained {STEPS} steps in {seconds:.0f} s; {len(tags)} decomposition tags under {args.out / 'runs'}")
    for tag in tags:
        print(f"  {tag}  ({len(scalars[tag])} points)")
    columns = [t for t in tags if "/all/" in t] + [t for t in tags if "/query/" in t or "/value/" in t]
    loss = scalars.get("train/loss", [])
    print("\n| step | " + " | ".join(f"`{c.split('decomposition/')[1]}`" for c in columns) + " | `train/loss` |")
    print("|---:|" + "---:|" * (len(columns) + 1))
    steps = sorted({s for c in columns for s, _ in scalars[c]})
    for step in steps:
        values = [dict(scalars[c]).get(step) for c in columns] + [dict(loss).get(step)]
        print(f"| {step} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " |")
    draw(scalars, args.png)
    print(f"\nwrote {args.png}")


def draw(scalars: dict[str, list[tuple[int, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.0), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, ("mean_delta_m", "mean_delta_d", "pearson_r"), strict=True):
        for kind in ("all", "query", "value"):
            series = sorted(scalars.get(f"train/decomposition/{kind}/{name}", []))
            if series:
                ax.plot(*zip(*series, strict=True), marker="o", ms=3, label=kind)
        ax.set_title(f"decomposition/*/{name}", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main()
