"""Forward functions that :func:`vfm.integrations.apply_vfm` installs on a transformers model instance.

Private module: the public API and its documentation are in :mod:`vfm.integrations.transformers`.
State lives on the patched instance (``model.__dict__["_vfm_state"]``), so the functions here are
shared by every patched model and ``copy.deepcopy`` of a patched model is patched independently.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import types
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from vfm.ops.kce_api import knowledge_cross_entropy

logger = logging.getLogger("vfm.integrations")

#: Extra forward keyword arguments (batch keys) the patched models accept.
BATCH_KEYS = ("teacher_logits", "teacher_topk_indices", "teacher_topk_logprobs", "allowed", "allowed_group_ids",
              "soft_mask", "return_logits")

# Per-token keys: pad value when shifted like the labels (the padded last row never counts).
_PER_TOKEN_PAD = {"teacher_logits": 0.0, "teacher_topk_indices": -1, "teacher_topk_logprobs": 0.0, "allowed": True,
                  "allowed_group_ids": -1, "soft_mask": False}
_TEACHER_KEYS = ("teacher_logits", "teacher_topk_indices", "teacher_topk_logprobs")
# Dims after the per-row ones: (V) for teacher logits and allowed masks, (k) for the top-k teacher.
_TRAILING_DIMS = {"teacher_logits": 1, "teacher_topk_indices": 1, "teacher_topk_logprobs": 1, "allowed": 1,
                  "allowed_group_ids": 0, "soft_mask": 0}

class _Missing:
    """"No instance-level forward before patching": one object, kept by copy.deepcopy and pickle."""

    def __reduce__(self):
        return "_MISSING"  # a global of this module: copies and unpickled models get this very object

    def __repr__(self) -> str:
        return "<no instance forward>"


_MISSING = _Missing()
_STATE = "_vfm_state"


class _State:
    """What apply_vfm stored on one model instance."""

    def __init__(self, kind: str, options: Dict[str, Any], group_masks: Optional[Tensor], return_logits: bool,
                 teacher_frame: str, fused_options: Dict[str, Any], original: Any):
        self.kind = kind
        self.options = options
        self.group_masks = group_masks
        self.return_logits = return_logits
        self.teacher_frame = teacher_frame
        self.fused_options = fused_options
        self.original = original  # the instance's own `forward` attribute before patching, or _MISSING
        self.noted_logits_path = False


def _plain_linear(module: Optional[nn.Module]) -> Optional[nn.Linear]:
    """The nn.Linear whose weight/bias compute ``module``'s output, or None when that is not simple."""
    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        ModulesToSaveWrapper = ()
    if ModulesToSaveWrapper and isinstance(module, ModulesToSaveWrapper):
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return None
        active = list(module.active_adapters)
        if module.disable_adapters or not active or any(a not in module.modules_to_save for a in active):
            return _plain_linear(module.original_module)
        return _plain_linear(module.modules_to_save[active[0]])
    if (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__):
        return module
    return None


# ------------------------------------------------------------------------------------------ forward --
def _original(model: nn.Module, state: _State):
    if state.original is _MISSING:
        return types.MethodType(type(model).forward, model)
    return state.original


_REPLICATE = "_replicate_for_data_parallel"


class _Bound:
    """``function`` bound to ``module``, like ``types.MethodType``, but pickled as ``(function, module)``.

    A bound method pickles as ``getattr(module, name)``, which on loading finds the *class's* forward:
    ``torch.save(model)`` / ``torch.load`` gave a model that looked patched but ran the original forward.
    """

    def __init__(self, function, module: nn.Module):
        self.__func__ = function
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (type(self), (self.__func__, self.__self__))

    def __repr__(self) -> str:
        return f"<vfm {self.__func__.__name__} of {type(self.__self__).__name__}>"


class _PatchedForward(_Bound):
    """The instance ``forward`` apply_vfm installs: signature = the original's plus the batch keys."""

    _vfm_patched = True

    @property
    def __doc__(self):  # noqa: D105 - shown by help(model.forward)
        return (f"vfm-patched forward: the original forward's arguments plus the batch keys {', '.join(BATCH_KEYS)}. "
                "See vfm.integrations.transformers.")

    @property
    def __signature__(self) -> inspect.Signature:
        state = self.__self__.__dict__[_STATE]
        original = inspect.signature(_original(self.__self__, state))
        params, var_keyword = [], inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)
        for p in original.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_keyword = p
            else:
                params.append(p)
        names = {p.name for p in params}
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for k in BATCH_KEYS if k not in names]
        return inspect.Signature(params + [var_keyword], return_annotation=original.return_annotation)


def _forward_entry(self: nn.Module, *args, **kwargs):
    """The patched forward: vfm's loss for the model kind apply_vfm found."""
    impl = _causal_forward if self.__dict__[_STATE].kind == "causal" else _classification_forward
    return impl(self, args, kwargs)


def _replicate_entry(self: nn.Module) -> nn.Module:
    """``nn.DataParallel`` replica of a patched model whose ``forward`` is bound to the replica.

    ``Module._replicate_for_data_parallel`` copies ``__dict__``, so the instance ``forward`` would stay
    bound to the original module: every replica would run the original's weights (on device 0).
    """
    replica = type(self)._replicate_for_data_parallel(self)
    for name in ("forward", _REPLICATE):
        bound = replica.__dict__.get(name)
        if isinstance(bound, _Bound) and bound.__self__ is self:
            replica.__dict__[name] = type(bound)(bound.__func__, replica)
    return replica


def _named_arguments(model: nn.Module, state: _State, args: tuple, kwargs: dict) -> dict:
    """Positional arguments mapped to the original forward's parameter names, plus the keywords."""
    kw = dict(kwargs)
    if args:
        names = [p.name for p in inspect.signature(_original(model, state)).parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(names):
            raise TypeError(f"forward takes at most {len(names)} positional arguments ({', '.join(names)}), "
                            f"got {len(args)}")
        for name, value in zip(names, args):
            if name in kw:
                raise TypeError(f"forward got multiple values for argument {name!r}")
            kw[name] = value
    return kw


def _pop_batch_keys(kw: dict, state: _State) -> Tuple[Dict[str, Tensor], Optional[bool]]:
    found = {k: kw.pop(k) for k in BATCH_KEYS if k in kw}
    return_logits = found.pop("return_logits", None)
    if return_logits is not None and not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
    extras = {k: v for k, v in found.items() if v is not None}
    for key, value in extras.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"batch key {key!r} must be a torch.Tensor, got {type(value).__name__}")
    if ("teacher_topk_indices" in extras) != ("teacher_topk_logprobs" in extras):
        raise ValueError("teacher_topk_indices and teacher_topk_logprobs must be given together")
    if "allowed" in extras and "allowed_group_ids" in extras:
        raise ValueError("give either allowed (bool, *, V) or allowed_group_ids (int, *), not both")
    if "allowed_group_ids" in extras and state.group_masks is None:
        raise ValueError("allowed_group_ids needs the group masks: apply_vfm(model, allowed_group_masks=(G, V) bool)")
    return extras, return_logits


def _no_labels(extras: Dict[str, Tensor]) -> None:
    if extras:
        raise ValueError(f"batch keys {sorted(extras)} were given without labels; vfm's loss needs labels "
                         "(use ignore_index, -100, for tokens or rows without a gold label)")


def _loss_arguments(extras: Dict[str, Tensor], state: _State, device: torch.device) -> Dict[str, Any]:
    """knowledge_cross_entropy keyword arguments from the (already aligned) batch keys and the options."""
    out = dict(state.options)
    if isinstance(out.get("weight"), Tensor):
        out["weight"] = out["weight"].to(device)
    if "teacher_logits" in extras:
        out["teacher_logits"] = extras["teacher_logits"]
    if "teacher_topk_indices" in extras:
        out["teacher_topk"] = (extras["teacher_topk_indices"], extras["teacher_topk_logprobs"])
    if "allowed" in extras:
        out["allowed"] = extras["allowed"]
    if "allowed_group_ids" in extras:
        out["allowed"] = (state.group_masks.to(device), extras["allowed_group_ids"])
    if "soft_mask" in extras:
        out["soft_mask"] = extras["soft_mask"]
    return out


def _finish(output, return_dict: Optional[bool], model: nn.Module, keep_logits_slot: bool = False):
    """``output`` as the model returns it: a ModelOutput, or with ``return_dict=False`` its tuple.

    ``keep_logits_slot`` (fused loss, no logits): the tuple is ``(loss, None, cache, ...)``, so the
    positions are transformers' ``(loss, logits, ...)``; ``to_tuple`` alone would drop the ``None`` and
    put the cache where callers unpack the logits.
    """
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if not return_dict and not isinstance(output, tuple):
        if keep_logits_slot:
            return (output.loss, None) + output.to_tuple()[1:]
        return output.to_tuple()
    return output


def _with_loss(output, loss: Tensor):
    """A copy of a transformers ModelOutput with ``loss`` set (first field, as the model would return it)."""
    values = {f.name: getattr(output, f.name, None) for f in dataclasses.fields(output)}
    values["loss"] = loss
    return type(output)(**values)


def _num_items(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device)
    return value


# ---------------------------------------------------------------------------------------- causal LM --
def _shift(t: Tensor, seq_dim: int, pad) -> Tensor:
    """``t`` moved one step left along ``seq_dim`` (row i gets row i+1), the last row filled with ``pad``."""
    pad_shape = list(t.shape)
    pad_shape[seq_dim] = 1
    return torch.cat([t.narrow(seq_dim, 1, t.shape[seq_dim] - 1), t.new_full(pad_shape, pad)], dim=seq_dim)


def _check_call_ignore_index(value, state: _State) -> None:
    """transformers passes a forward ``ignore_index=`` to its loss; vfm's comes from apply_vfm (one value)."""
    configured = state.options.get("ignore_index", -100)
    if value is not None and value != configured:
        raise ValueError(f"forward got ignore_index={value!r} but this model was patched with ignore_index="
                         f"{configured!r}; vfm ignores the labels equal to apply_vfm(model, ignore_index=...): "
                         "pass it there (transformers' Trainer counts -100 for num_items_in_batch)")


def _check_label_dtype(name: str, labels: Tensor) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class ids (torch.long), got dtype {labels.dtype} "
                        f"with shape {tuple(labels.shape)}")


def _causal_targets(labels: Optional[Tensor], shift_labels: Optional[Tensor], extras: Dict[str, Tensor],
                    lead_shape: tuple, state: _State, device: torch.device) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Targets and batch keys aligned with the rows of the hidden states / logits (``lead_shape``)."""
    ignore_index = state.options.get("ignore_index", -100)
    given = shift_labels if shift_labels is not None else labels
    if not isinstance(given, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(given).__name__}")
    _check_label_dtype("labels" if shift_labels is None else "shift_labels", given)
    given = given.to(device)
    shifted = shift_labels is None
    target = _shift(given, given.dim() - 1, ignore_index) if shifted else given
    n_rows = math.prod(lead_shape)
    if target.numel() != n_rows:
        raise ValueError(f"{'labels' if shifted else 'shift_labels'} have shape {tuple(given.shape)} "
                         f"({target.numel()} targets) but the model predicts {n_rows} positions {tuple(lead_shape)} "
                         "(with logits_to_keep, labels must cover the kept positions)")
    aligned = {}
    for key, value in extras.items():
        value = value.to(device)
        if tuple(value.shape[:given.dim()]) != tuple(given.shape):
            raise ValueError(f"batch key {key!r} has shape {tuple(value.shape)}; its leading dims must be the "
                             f"labels' shape {tuple(given.shape)}")
        follows_labels = key not in _TEACHER_KEYS or state.teacher_frame == "labels"
        if shifted and follows_labels:
            value = _shift(value, given.dim() - 1, _PER_TOKEN_PAD[key])
        aligned[key] = value.reshape(tuple(lead_shape) + tuple(value.shape[given.dim():]))
    return target.reshape(lead_shape), aligned


def _autocast_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast like ``nn.Linear`` under autocast would, so the fused loss sees what lm_head would have."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return hidden, weight, bias


def _fused_causal_loss(model, kw, labels, shift_labels, extras, num_items, state, head: nn.Linear):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    try:
        from vfm.functional import fused_linear_knowledge_cross_entropy
    except ImportError as exc:  # pragma: no cover - part of vfm
        raise RuntimeError("vfm.functional.fused_linear_knowledge_cross_entropy is not available in this vfm "
                           "build; call the model with return_logits=True") from exc

    logits_to_keep = kw.pop("logits_to_keep", 0)
    outputs = getattr(model, model.base_model_prefix)(**kw)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    target, aligned = _causal_targets(labels, shift_labels, extras, tuple(hidden.shape[:-1]), state, hidden.device)
    options = _loss_arguments(aligned, state, hidden.device)
    if "weight" in options:
        options["class_weight"] = options.pop("weight")
    hidden, weight, bias = _autocast_head(hidden, head.weight, head.bias)
    loss = fused_linear_knowledge_cross_entropy(
        hidden, weight, target, bias, softcap=getattr(model.config, "final_logit_softcapping", None),
        num_items_in_batch=_num_items(num_items, hidden.device), **options, **state.fused_options)
    return CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def _causal_forward(model: nn.Module, args: tuple, kwargs: dict):
    state: _State = model.__dict__[_STATE]
    kw = _named_arguments(model, state, args, kwargs)
    return_dict = kw.pop("return_dict", None)
    extras, return_logits = _pop_batch_keys(kw, state)
    labels = kw.pop("labels", None)
    shift_labels = kw.pop("shift_labels", None)
    num_items = kw.pop("num_items_in_batch", None)
    _check_call_ignore_index(kw.pop("ignore_index", None), state)
    if labels is None and shift_labels is None:
        _no_labels(extras)
        return _finish(_original(model, state)(**kw, return_dict=True), return_dict, model)
    if return_logits is None:
        return_logits = state.return_logits
    head = _plain_linear(model.get_output_embeddings())
    if model.training and not return_logits:
        if head is not None:
            output = _fused_causal_loss(model, kw, labels, shift_labels, extras, num_items, state, head)
            return _finish(output, return_dict, model, keep_logits_slot=True)
        if not state.noted_logits_path:
            state.noted_logits_path = True
            logger.warning("vfm: %s's output layer is not a plain nn.Linear (%s: an adapter or a hook on it); "
                           "training computes the logits and then vfm's loss on them", type(model).__name__,
                           type(model.get_output_embeddings()).__name__)
    output = _original(model, state)(**kw, return_dict=True)
    logits = output.logits
    target, aligned = _causal_targets(labels, shift_labels, extras, tuple(logits.shape[:-1]), state, logits.device)
    loss = knowledge_cross_entropy(logits, target, num_items_in_batch=_num_items(num_items, logits.device),
                                   **_loss_arguments(aligned, state, logits.device))
    return _finish(_with_loss(output, loss), return_dict, model)


# ----------------------------------------------------------------------------------- classification --
def _problem_type(model: nn.Module, labels: Tensor) -> str:
    """transformers' rule for a sequence classifier's problem type (set on the config as it does)."""
    config = model.config
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif config.num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    return config.problem_type


def _classification_forward(model: nn.Module, args: tuple, kwargs: dict):
    state: _State = model.__dict__[_STATE]
    kw = _named_arguments(model, state, args, kwargs)
    return_dict = kw.pop("return_dict", None)
    extras, _ = _pop_batch_keys(kw, state)
    labels = kw.pop("labels", None)
    num_items = kw.pop("num_items_in_batch", None)
    original = _original(model, state)
    if labels is None:
        _no_labels(extras)
        return _finish(original(**kw, return_dict=True), return_dict, model)
    if state.kind == "sequence" and _problem_type(model, labels) != "single_label_classification":
        if extras:
            raise ValueError(f"batch keys {sorted(extras)} need a single-label classification problem; this model's "
                             f"problem_type is {model.config.problem_type!r}")
        if num_items is not None:
            kw["num_items_in_batch"] = num_items
        return _finish(original(**kw, labels=labels, return_dict=True), return_dict, model)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    _check_label_dtype("labels", labels)
    output = original(**kw, return_dict=True)
    logits = output.logits
    lead_shape = tuple(logits.shape[:-1])
    if labels.numel() != math.prod(lead_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits have shape {tuple(logits.shape)}")
    target = labels.to(logits.device).reshape(lead_shape)
    aligned = {}
    for key, value in extras.items():
        value = value.to(logits.device)
        n_trailing = _TRAILING_DIMS[key]
        trailing = tuple(value.shape[value.dim() - n_trailing:]) if value.dim() >= n_trailing else ()
        if value.dim() < n_trailing or value.numel() != math.prod(lead_shape + trailing):
            raise ValueError(f"batch key {key!r} has shape {tuple(value.shape)}; its leading dims must match the "
                             f"labels {tuple(labels.shape)} (logits {tuple(logits.shape)})")
        aligned[key] = value.reshape(lead_shape + trailing)
    loss = knowledge_cross_entropy(logits, target, num_items_in_batch=_num_items(num_items, logits.device),
                                   **_loss_arguments(aligned, state, logits.device))
    return _finish(_with_loss(output, loss), return_dict, model)
