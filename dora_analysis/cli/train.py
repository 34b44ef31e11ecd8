"""``dora-train``: FT, LoRA and DoRA runs with intermediate checkpoints, from the shell.

Thin by design: parse into a :class:`~dora_analysis.train.config.TrainConfig`, call
:func:`~dora_analysis.train.loop.train`, print what was written. The options are generated
from ``TrainConfig``'s fields (name, type, default, and the help in each field's metadata), so
``--help`` and the dataclass cannot disagree. torch and transformers are imported after
parsing, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from typing import TYPE_CHECKING, Any, Literal

from ..console import run_main

if TYPE_CHECKING:
    from ..train.config import TrainConfig
    from ..train.loop import TrainResult

PROG = "dora-train"

EPILOG = """\
quick start (all-MiniLM-L6-v2, built-in synthetic task; 20-40 s each on 2 CPU cores):
  dora-train --method dora --out runs/dora
  dora-train --method lora --out runs/lora
  dora-train --method ft   --out runs/ft --save-steps 195,210,225,240   # FT snapshots are ~90 MB
  dora-analyze runs/dora/checkpoint-240 --modules 'attention\\.self\\.query'

more:
  dora-train --method dora --out runs/tab6 --magnitude-only 'attention\\.output\\.dense|intermediate'
  dora-train --method lora --out runs/mine --model path/to/hf_model --data train.jsonl \\
             --target-regex 'layer\\.\\d+\\.attention\\.self\\.(query|key|value)'
  dora-train --method dora --out runs/dora --resume        # continue after a kill

exit status: 0 ok, 2 bad input, 130 interrupted (resume with --resume).
"""


def _options() -> list[tuple[dataclasses.Field[Any], Any]]:
    """``TrainConfig``'s fields with their resolved types (``X | None`` unwrapped to ``X``)."""
    from ..train.config import TrainConfig  # no torch: the parser stays instant

    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        args = typing.get_args(kind)
        if type(None) in args:  # Optional: the option is simply not given
            (kind,) = [a for a in args if a is not type(None)]
        out.append((f, kind))
    return out


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _shown(value: Any) -> str:
    """A default as the user would type it: ``query,value``, ``16`` (not ``16.0``)."""
    if isinstance(value, tuple):
        return ",".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _argument(f: dataclasses.Field[Any], kind: Any) -> dict[str, Any]:
    """``add_argument`` keywords for one field: type or choices from its annotation, default from the dataclass."""
    meta = f.metadata
    kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
        if not (f.default is None or isinstance(f.default, bool) or f.default == ()):  # those the help words itself
            kw["help"] += f" (default {_shown(f.default)})"
    if kind is bool:
        # A flag flips the default: --rslora turns on, --quiet turns progress off.
        kw["action"] = "store_false" if f.default else "store_true"
        return kw
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    if typing.get_origin(kind) is Literal:
        kw["choices"] = typing.get_args(kind)
    elif typing.get_origin(kind) is not tuple:  # lists stay text: config_from_args splits them
        kw["type"] = kind
    return kw


def build_parser() -> argparse.ArgumentParser:
    """The ``dora-train`` argument parser, one option per :class:`TrainConfig` field."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a local transformers encoder with a classification head by full fine-tuning, "
        "LoRA or DoRA, saving checkpoints that dora-analyze (and PEFT) read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    last = p
    for f, kind in _options():
        group = f.metadata.get("group")
        target = p if group is None else groups.setdefault(group, p.add_argument_group(group))
        names = [_flag(f), *([f.metadata["short"]] if "short" in f.metadata else [])]
        target.add_argument(*names, **_argument(f, kind))
        last = target
    last.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _split(text: str, flag: str, item: type) -> tuple[Any, ...]:
    """``"195, 210,225"`` -> ``(195, 210, 225)``: a comma-separated option as a tuple."""
    try:
        return tuple(item(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        from ..errors import InputError

        raise InputError(f"{flag} takes comma-separated {'integers' if item is int else 'values'}, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed arguments into a validated :class:`TrainConfig` (every option is a field)."""
    from ..train.config import TrainConfig

    values = {}
    for f, kind in _options():
        value = getattr(args, f.name)
        if typing.get_origin(kind) is tuple and isinstance(value, str):
            value = _split(value, _flag(f), typing.get_args(kind)[0])
        values[f.name] = value
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dora-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args), debug=args.debug, on_interrupt="interrupted; continue with --resume")


def _run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    config = config_from_args(args)
    started = time.perf_counter()
    result = train(config)
    if config.progress:
        print(format_result(result, time.perf_counter() - started))
    return 0


def format_result(result: TrainResult, seconds: float) -> str:
    """A short report: where the run is, its checkpoints, and the loss along the way."""
    lines = [
        f"run: {result.run_dir}  ({seconds:.1f} s"
        + (f", resumed at step {result.resumed_from})" if result.resumed_from is not None else ")")
    ]
    if not result.checkpoints:
        lines.append("nothing to do: the run is already complete")
        return "\n".join(lines)
    by_step = {int(h["step"]): h for h in result.history}
    lines.append(f"{'checkpoint':<16} {'loss (last 15 steps)':>20} {'eval loss':>10} {'eval acc':>9} {'lr':>10}")
    for ckpt in result.checkpoints:
        step = int(ckpt.name.rsplit("-", 1)[1])
        window = [by_step[s]["loss"] for s in range(max(1, step - 14), step + 1) if s in by_step]
        rec = by_step.get(step, {})
        ev_loss, ev_acc = rec.get("eval_loss", float("nan")), rec.get("eval_accuracy", float("nan"))
        lines.append(
            f"{ckpt.name:<16} {sum(window) / len(window):>20.4f} {ev_loss:>10.4f} {ev_acc:>9.3f} {rec.get('learning_rate', float('nan')):>10.2e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
