"""Hugging Face transformers' DiNAT and NAT on flexna (NATTEN's legacy ops are gone from NATTEN >= 0.20).

transformers' ``modeling_dinat`` calls NATTEN's split ops ``natten2dqkrpb`` / ``natten2dav``, which
NATTEN 0.20 removed (with a current NATTEN installed the module does not even import), and the
current release passes them ``[batch, W, H, heads, dim]`` where they expect ``[batch, heads, H, W,
dim]``. ``dinat_module()`` imports the module without those ops and lets its models be built without
NATTEN; ``apply_neighborhood_attention(model)`` runs every ``NeighborhoodAttention`` of a DiNAT
model as one :func:`flexna.na2d` call with the layer's ``rpb`` (the legacy ops' definition:
scores ``q·k / sqrt(dim) + rpb``, softmax over the dilated ``kernel_size²`` neighborhood), and
``remove_neighborhood_attention(model)`` undoes it. Weights and state_dict keys stay as they are::

    from flexna.integrations.transformers import apply_neighborhood_attention, dinat_module

    dinat = dinat_module()
    model = apply_neighborhood_attention(dinat.DinatForImageClassification.from_pretrained(name))

The deprecated NAT (``nat_module()``: ``transformers.models.deprecated.nat``, dilation 1) works the
same way where the installed transformers still ships it (transformers < 5; 5.x removed it).

``output_attentions=True`` and attention dropout in training are not available (flexna computes no
attention probabilities) and raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

import torch

from flexna.functional import na2d

__all__ = ["apply_neighborhood_attention", "dinat_module", "nat_module", "remove_neighborhood_attention"]

MODULES = {"DiNAT": "transformers.models.dinat.modeling_dinat",
           "NAT": "transformers.models.deprecated.nat.modeling_nat"}
_FLEX_CLASSES: dict[type, type] = {}  # stock NeighborhoodAttention class -> its flexna subclass


def dinat_module() -> ModuleType:
    """transformers' ``modeling_dinat``, imported without NATTEN's legacy ops; its models can then
    be built without NATTEN (their attention must run on flexna: :func:`apply_neighborhood_attention`)."""
    return _import("DiNAT")


def nat_module() -> ModuleType:
    """transformers' deprecated ``modeling_nat`` (NAT), imported as :func:`dinat_module` imports
    DiNAT; ``ImportError`` naming the version where the installed transformers has no NAT (5.x)."""
    return _import("NAT")


def _import(model: str) -> ModuleType:
    name = MODULES[model]
    module = sys.modules.get(name)
    if module is None:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
            import transformers

            raise ImportError(f"transformers {transformers.__version__} has no {model} ({name}): the "
                              "deprecated NAT was removed in transformers 5; install transformers<5 to run "
                              "NAT models")
        utils: Any = importlib.import_module("transformers.utils")
        available = utils.is_natten_available
        utils.is_natten_available = lambda: False  # take the module's stand-ins, not NATTEN's import
        try:
            module = importlib.import_module(name)
        finally:
            utils.is_natten_available = available
    dinat: Any = module
    if not getattr(dinat.requires_backends, "_flexna", False):
        stock = dinat.requires_backends

        def requires_backends(obj: Any, backends: Any) -> None:
            rest = [b for b in ([backends] if isinstance(backends, str) else backends) if b != "natten"]
            if rest:
                stock(obj, rest)

        requires_backends._flexna = True  # type: ignore[attr-defined]
        dinat.requires_backends = requires_backends
    return module


def _flexna_forward(self: Any, hidden_states: torch.Tensor, output_attentions: bool | None = False
                    ) -> tuple[torch.Tensor]:
    """``NeighborhoodAttention.forward`` of transformers' DiNAT / NAT as one :func:`flexna.na2d` call."""
    if output_attentions:
        raise ValueError("output_attentions=True is not supported on flexna (it computes no attention "
                         "probabilities); call remove_neighborhood_attention(model) to get them")
    if self.training and self.dropout.p > 0:
        raise ValueError(f"attention dropout (attention_probs_dropout_prob = {self.dropout.p}) is not "
                         "supported on flexna in training: set it to 0")
    batch, height, width, _ = hidden_states.shape
    shape = (batch, height, width, self.num_attention_heads, self.attention_head_size)
    query, key, value = (proj(hidden_states).view(shape) for proj in (self.query, self.key, self.value))
    out = na2d(query, key, value, self.kernel_size, dilation=getattr(self, "dilation", 1),  # NAT: none
               scale=self.attention_head_size ** -0.5, rel_pos_bias=self.rpb)
    return (out.reshape(batch, height, width, self.all_head_size),)


def _flex_class(stock: type) -> type:
    if stock not in _FLEX_CLASSES:
        _FLEX_CLASSES[stock] = type(f"FlexNA{stock.__name__}", (stock,), {
            "forward": _flexna_forward, "__doc__": f"{stock.__name__} run by flexna.na2d (same weights)."})
    return _FLEX_CLASSES[stock]


def _stock_classes() -> list[type]:
    """The ``NeighborhoodAttention`` classes of the models the installed transformers ships."""
    classes = [dinat_module().NeighborhoodAttention]
    with contextlib.suppress(ImportError):  # transformers >= 5: no NAT
        classes.append(nat_module().NeighborhoodAttention)
    return classes


def apply_neighborhood_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Run every DiNAT / NAT ``NeighborhoodAttention`` of ``model`` on flexna (in place; returns
    ``model``). ``TypeError`` when ``model`` holds none (not a transformers DiNAT or NAT model)."""
    stock = _stock_classes()
    found = [m for m in model.modules() if type(m) in stock or type(m) in _FLEX_CLASSES.values()]
    if not found:
        raise TypeError(f"model is a {type(model).__name__} with no transformers DiNAT NeighborhoodAttention "
                        "layer (flexna's transformers integration supports DiNAT and NAT models)")
    for m in found:
        if type(m) in stock:
            m.__class__ = _flex_class(type(m))
    return model


def remove_neighborhood_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Put back transformers' own ``NeighborhoodAttention`` (it needs NATTEN's legacy ops to run)."""
    by_flex = {flex: stock for stock, flex in _FLEX_CLASSES.items()}
    found = [m for m in model.modules() if type(m) in by_flex]
    if not found:
        raise ValueError(f"{type(model).__name__} has no flexna attention to remove")
    for m in found:
        m.__class__ = by_flex[type(m)]
    return model
