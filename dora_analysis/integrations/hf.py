"""``DecompositionCallback``: the magnitude / direction picture while a ``transformers.Trainer`` runs.

Three lines in a training script::

    from dora_analysis.integrations.hf import DecompositionCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DecompositionCallback()])
    trainer.train()

At every save (and every N steps if asked) it measures the live model against its weights as
training began, in memory: the same plan, engine and metrics as ``dora-analyze``, and for
PEFT LoRA / DoRA models the same merge as the adapter reader, fed the tensors PEFT saves
(``get_peft_model_state_dict``), so ``decomposition.csv`` in ``args.output_dir`` equals
``dora-analyze BASE OUTPUT_DIR`` on the saved checkpoints. Summary scalars go through
``Trainer.log``, so every ``report_to`` integration (TensorBoard, W&B, MLflow) and
``trainer.state.log_history`` receive them; the figure-2 PNG is written when training ends.
Nothing of the model changes: its tensors are read, never written, and no RNG is drawn.
"""

from __future__ import annotations

import inspect
import json
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..containers import MemoryStore, TensorStore, open_checkpoint
from ..snapshot import FullSnapshot, Snapshot
from .live import LiveDecomposition, base_copy


class DecompositionCallback(TrainerCallback):
    """Per-matrix dM and dD of the model being trained, at each save, in memory.

    Args:
        base: The base model (a checkpoint path or an open ``TensorStore``), or None for the
            model's own weights when training begins (copied to the CPU in their stored
            dtype, only the selected matrices). A run resumed from a checkpoint needs it.
        modules: Regex of the matrices to analyse (default: ``dora-analyze``'s, the 2-D
            weights inside numbered blocks).
        metrics: Metric names (default ``("md",)``).
        every_n_steps: Also measure every N optimizer steps, without a checkpoint.
        on_save: Measure at each checkpoint the Trainer saves.
        figures: Write ``decomposition.png`` (the paper's figure 2) when training ends.
        metric_options: Metric settings, e.g. ``{"axis": "in"}``.
    """

    def __init__(
        self,
        base: str | Path | TensorStore | None = None,
        modules: str | None = None,
        metrics: Sequence[str] = ("md",),
        every_n_steps: int | None = None,
        on_save: bool = True,
        figures: bool = True,
        metric_options: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.base = base
        self.modules = modules
        self.metrics = tuple(metrics)
        self.every_n_steps = every_n_steps
        self.measure_on_save = on_save
        self.figures = figures
        self.metric_options = dict(metric_options or {})
        self.live: LiveDecomposition | None = None
        self._trainer: weakref.ref[Trainer] | None = None
        self._measured: set[int] = set()
        self._warned = False

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.live = None
        self._measured = set()
        if not state.is_world_process_zero:
            return
        model = kwargs["model"]
        out = Path(args.output_dir)
        if self.base is None and state.global_step > 0:
            warnings.warn(
                "DecompositionCallback: training resumes at step "
                f"{state.global_step}, so the model's weights now are not the base; pass base= the "
                "pretrained model's path to keep measuring. The callback is off for this run.",
                stacklevel=2,
            )
            return
        base = self._base_store(model, out)
        self.live = LiveDecomposition(base, out, modules=self.modules, metrics=self.metrics, metric_options=self.metric_options)
        if state.global_step > 0:
            self.live.resume(state.global_step)
        trainer = _calling_trainer()
        self._trainer = None if trainer is None else weakref.ref(trainer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._measure(state, control, kwargs["model"])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.measure_on_save:
            self._measure(state, control, kwargs["model"])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.live is not None and self.figures:
            self.live.write_figure()

    # -- the work -------------------------------------------------------------------------

    def _measure(self, state: TrainerState, control: TrainerControl, model: torch.nn.Module) -> None:
        step = state.global_step
        if self.live is None or step in self._measured:
            return
        self._measured.add(step)
        rows = self.live.measure(step, live_snapshot(model, self.live.out / f"checkpoint-{step}"))
        scalars = self.live.scalars(rows)
        trainer = None if self._trainer is None else self._trainer()
        if trainer is not None:
            # Trainer.log clears control.should_log; called from on_step_end, that would drop the
            # Trainer's own log (the loss) of a step that is due one. Put the flag back.
            should_log = control.should_log
            trainer.log(dict(scalars))  # every report_to integration, and state.log_history
            control.should_log = trainer.control.should_log = should_log
        else:
            state.log_history.append({**scalars, "step": step})
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "DecompositionCallback: not called by a transformers.Trainer, so its scalars reach "
                    "state.log_history only, not the report_to loggers",
                    stacklevel=2,
                )

    def _base_store(self, model: torch.nn.Module, out: Path) -> TensorStore:
        if isinstance(self.base, TensorStore):
            return self.base
        if self.base is not None:
            return open_checkpoint(self.base)
        peft = _peft_model(model)
        if peft is not None:
            inner = peft.get_base_model()
            tensors = {_strip_base_layer(k): v for k, v in inner.state_dict().items() if not _is_adapter_key(k)}
            return base_copy(tensors, self.modules, out, _config(inner))
        return base_copy(model.state_dict(), self.modules, out, _config(model))


def live_snapshot(model: torch.nn.Module, path: Path) -> Snapshot:
    """The model's weights now, as the snapshot its checkpoint would be (nothing is copied).

    A plain model is a full checkpoint of its state dict; a PEFT model is its adapter, the
    tensors ``get_peft_model_state_dict`` gives (what ``save_pretrained`` writes) and its
    config as ``adapter_config.json`` holds it, read by the same reader as the saved file.
    """
    peft = _peft_model(model)
    if peft is None:
        return FullSnapshot(MemoryStore(model.state_dict(), path, _config(model)))
    from peft import get_peft_model_state_dict

    from ..adapters.peft import PeftLora
    from ..adapters.vera import PeftVera

    name = peft.active_adapter if isinstance(peft.active_adapter, str) else peft.active_adapter[0]
    config = json.loads(json.dumps(peft.peft_config[name].to_dict(), default=_jsonable))
    readers = {"LORA": PeftLora, "VERA": PeftVera}
    reader = readers.get(str(config.get("peft_type", "")).upper())
    if reader is None:
        raise ValueError(f"DecompositionCallback reads LoRA, DoRA and VeRA models, not {config.get('peft_type')}")
    tensors = get_peft_model_state_dict(peft, adapter_name=name)
    return reader(path, config, MemoryStore(tensors, path / "adapter_model.safetensors"))


def _peft_model(model: torch.nn.Module) -> Any:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return model if isinstance(model, PeftModel) else None


def _config(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {}


def _is_adapter_key(key: str) -> bool:
    return any(part.startswith(("lora_", "vera_")) or part == "modules_to_save" for part in key.split("."))


def _strip_base_layer(key: str) -> str:
    """A wrapped layer's weight under the name the unwrapped model gives it."""
    return ".".join(part for part in key.split(".") if part not in ("base_layer", "original_module"))


def _jsonable(value: object) -> object:
    """As PEFT writes its config: sets as lists, enums and other objects as their value or text."""
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
    return getattr(value, "value", str(value))


def _calling_trainer() -> Trainer | None:
    """The ``Trainer`` whose callback handler is calling us (callbacks are not handed it).

    The Trainer's loop calls ``callback_handler.on_train_begin``, which calls this callback:
    the Trainer is ``self`` a few frames up. Its ``log`` is how the scalars reach every
    ``report_to`` integration, exactly as the Trainer's own loss does.
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(16):
            if caller is None:
                return None
            candidate = caller.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            caller = caller.f_back
        return None
    finally:
        del frame
