"""Train Hugging Face Transformers models on vfm's losses: :func:`apply_vfm` / :func:`unapply_vfm`.

``apply_vfm(model, **loss_options)`` patches *one model instance* (never its class: two models in one
process stay independent) so that its ``forward(..., labels=...)`` computes vfm's loss:

* **Causal LMs** (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 and Gemma3 ``*ForCausalLM``): in training
  mode the loss is :func:`vfm.functional.fused_linear_knowledge_cross_entropy` of the final hidden
  states and the LM head's weight (and bias), so the ``[tokens, vocab]`` logits are never materialised
  and ``outputs.logits`` is ``None``.  Logits are still computed and returned in eval mode
  (``model.eval()``, e.g. the Trainer's evaluation loop), when no labels are given (generation), when
  the call passes ``return_logits=True`` (or ``apply_vfm(..., return_logits=True)``), and when the LM
  head is not a plain ``nn.Linear`` (a PEFT LoRA layer on the head, a forward hook on it: logged
  once); the loss is then :func:`vfm.functional.knowledge_cross_entropy` of those logits.  Both paths
  give the same numbers.  Transformers' semantics are kept: ``labels`` are shifted inside the model
  (``shift_labels=`` is used as given), ``ignore_index`` (-100) rows do not count, the Trainer's
  ``num_items_in_batch`` replaces the mean's denominator (gradient accumulation), ``logits_to_keep``
  slices the hidden states first (labels must then cover the kept positions, as in transformers),
  Gemma's ``final_logit_softcapping`` becomes the loss's ``softcap``, and tied input/output
  embeddings receive the head's gradient (they are one Parameter).
* **Sequence and token classification** (``*ForSequenceClassification`` with a single-label problem,
  ``*ForTokenClassification``): the model's own forward computes the logits, the loss is
  :func:`~vfm.functional.knowledge_cross_entropy`.  Regression and multi-label problems keep
  transformers' loss (vfm batch keys are refused there).  Unlike transformers' BERT heads, a given
  ``num_items_in_batch`` is honoured (sum / num_items_in_batch, i.e. correct gradient accumulation).

Per-batch knowledge goes in as extra forward keyword arguments (batch keys, :data:`BATCH_KEYS`):
``teacher_logits`` (*, V), ``teacher_topk_indices`` + ``teacher_topk_logprobs`` (*, k), ``allowed``
(bool, *, V), ``allowed_group_ids`` (int, *; the group masks (G, V) are given once to ``apply_vfm``),
``soft_mask`` (bool, *) and ``return_logits``; ``*`` is the labels' shape.  Fixed options
(``kd_weight``, ``temperature``, ``kd``, ``penalty_weight``, ``penalty``, ``z_loss``, ...) are given
to ``apply_vfm``.  For causal LMs with ``labels`` the per-token keys describe the label positions and
are shifted like the labels (row t gets the value of t+1, the last row none), *except* the teacher,
which by default is in the logits frame: ``teacher_logits[:, t]`` is the teacher's prediction at
position t, exactly what ``teacher(input_ids).logits`` returns, aligned with the student's logits
and never shifted (no copy).  ``teacher_frame="labels"`` shifts the teacher like the labels instead.
With ``shift_labels`` nothing is shifted.

The patched ``forward`` lists the batch keys in its signature, so ``transformers.Trainer`` keeps
those dataset columns even with ``remove_unused_columns=True`` (the default); with a custom
collator make sure it stacks them.  ``unapply_vfm`` restores the original ``forward`` exactly.
PEFT models (and :func:`vfm.peft.accelerate`'d ones) are patched on their base model, the LM head
or classifier under the wrapper is the one used.

Example::

    model = AutoModelForCausalLM.from_pretrained(...)
    apply_vfm(model, kd_weight=0.5, temperature=2.0)
    out = model(input_ids=ids, labels=ids, teacher_logits=teacher(ids).logits)
    out.loss.backward()        # out.logits is None: no [B, T, V] tensor was made
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

# knowledge_cross_entropy arguments that come per batch or are fixed by the integration.
_PER_BATCH = ("logits", "target", "teacher_logits", "teacher_topk", "allowed", "soft_mask", "num_items_in_batch")
_FIXED = {
    "reduction": "the model returns one scalar loss (reduction='mean'; num_items_in_batch comes from the Trainer)",
    "softcap": "it comes from the model config (final_logit_softcapping)",
    "inplace_backward": "the logits are returned to the caller and must not be overwritten",
    "return_parts": "the model returns the loss only",
}
#: Loss options ``apply_vfm`` accepts (those of :func:`vfm.functional.knowledge_cross_entropy`).
LOSS_OPTIONS = tuple(name for name in inspect.signature(knowledge_cross_entropy).parameters
                     if name not in _PER_BATCH and name not in _FIXED)

#: Causal-LM classes whose forward (base model -> hidden states -> lm_head -> optional softcap -> loss)
#: was checked in transformers' source and is tested against the unpatched model.
CAUSAL_LM_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")

_MISSING = object()
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


# ------------------------------------------------------------------------------------------ finding --
def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model to patch: ``model`` itself or the base model under a PEFT wrapper."""
    from transformers import PreTrainedModel

    inner = model
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - peft is optional
        PeftModel = BaseTuner = ()
    if PeftModel and isinstance(inner, PeftModel):
        inner = inner.get_base_model()
    elif BaseTuner and isinstance(inner, BaseTuner):
        inner = inner.model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"apply_vfm needs a transformers PreTrainedModel (or a PEFT model wrapping one), got "
                        f"{type(model).__name__}")
    return inner


def _kind(model: nn.Module) -> str:
    mro = type(model).__mro__
    for cls in mro:
        if cls.__name__ in CAUSAL_LM_CLASSES and cls.__module__.startswith("transformers."):
            if type(model).forward is not cls.forward:
                raise TypeError(f"{type(model).__name__} overrides {cls.__name__}.forward; apply_vfm only patches "
                                f"the forward it knows ({cls.__module__}.{cls.__name__})")
            return "causal"
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        raise TypeError(f"apply_vfm does not support {name} yet; supported causal LMs: {', '.join(CAUSAL_LM_CLASSES)}")
    for cls in mro:
        if cls.__name__.endswith("ForSequenceClassification"):
            return "sequence"
        if cls.__name__.endswith("ForTokenClassification"):
            return "token"
    raise TypeError(f"apply_vfm supports causal LMs ({', '.join(CAUSAL_LM_CLASSES)}), *ForSequenceClassification "
                    f"and *ForTokenClassification models; got {name}")


def _num_classes(model: nn.Module, kind: str) -> int:
    if kind == "causal":
        head = model.get_output_embeddings()
        return int(head.weight.shape[0])
    return int(model.config.num_labels)


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


# ------------------------------------------------------------------------------------------ public --
def apply_vfm(model: nn.Module, *, allowed_group_masks: Optional[Tensor] = None, return_logits: bool = False,
              teacher_frame: str = "logits", fused_options: Optional[Dict[str, Any]] = None,
              **loss_options: Any) -> nn.Module:
    """Make ``model``'s forward compute vfm's knowledge cross-entropy when it gets labels (in place).

    Args:
        model: a transformers causal LM (see :data:`CAUSAL_LM_CLASSES`), ``*ForSequenceClassification``
            or ``*ForTokenClassification`` model, or a PEFT model wrapping one (patched on its base model).
        allowed_group_masks: (G, V) bool allowed-label sets; batches then give ``allowed_group_ids``
            (*) int, -1 = unconstrained.  V is the vocabulary (causal LM) or ``num_labels``.
        return_logits: causal LMs: also compute and return the logits in training (default False: the
            fused loss, ``outputs.logits is None``).  A ``return_logits=`` forward argument overrides it.
        teacher_frame: causal LMs with ``labels``: ``"logits"`` (default) takes ``teacher_logits`` /
            ``teacher_topk_*`` aligned with the student's logits (as ``teacher(input_ids).logits``), not
            shifted; ``"labels"`` shifts them like the labels.
        fused_options: extra options of :func:`vfm.functional.fused_linear_knowledge_cross_entropy` only
            (e.g. ``block_rows``, ``grad_accum_dtype``).
        **loss_options: options of :func:`vfm.functional.knowledge_cross_entropy` (:data:`LOSS_OPTIONS`:
            ``weight``, ``ignore_index``, ``label_smoothing``, ``z_loss``, ``ce_weight``, ``temperature``,
            ``kd_weight``, ``kd``, ``jsd_beta``, ``penalty_weight``, ``penalty``, ``rule_strength``).
            The defaults give plain cross-entropy, i.e. transformers' own loss.

    Returns:
        ``model`` itself (patched).  Calling ``apply_vfm`` again replaces the options and keeps one layer
        of patching; :func:`unapply_vfm` restores the original forward.

    Raises:
        TypeError: unsupported model, unknown option names, wrong option types.
        ValueError: bad option values (``teacher_frame``, ``allowed_group_masks`` shape).
    """
    target = _hf_model(model)
    kind = _kind(target)
    unknown = sorted(set(loss_options) - set(LOSS_OPTIONS))
    for name in unknown:
        if name in _FIXED:
            raise TypeError(f"apply_vfm does not take {name!r}: {_FIXED[name]}")
        if name in _PER_BATCH or name in BATCH_KEYS or name == "teacher_topk":
            raise TypeError(f"apply_vfm does not take {name!r}: it is per batch; pass it to the model's forward "
                            f"(batch keys: {', '.join(BATCH_KEYS)})")
    if unknown:
        raise TypeError(f"apply_vfm got unknown loss options {unknown}; known: {', '.join(LOSS_OPTIONS)}")
    if teacher_frame not in ("logits", "labels"):
        raise ValueError(f"teacher_frame must be 'logits' or 'labels', got {teacher_frame!r}")
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
    if fused_options is not None and not isinstance(fused_options, dict):
        raise TypeError(f"fused_options must be a dict, got {type(fused_options).__name__}")
    n_classes = _num_classes(target, kind)
    if allowed_group_masks is not None:
        if not isinstance(allowed_group_masks, Tensor) or allowed_group_masks.dtype != torch.bool \
                or allowed_group_masks.dim() != 2:
            raise TypeError("allowed_group_masks must be a 2-D bool tensor (G, V)")
        if allowed_group_masks.shape[1] != n_classes:
            raise ValueError(f"allowed_group_masks has shape {tuple(allowed_group_masks.shape)}; its second dim must "
                             f"be the model's {n_classes} classes")
    weight = loss_options.get("weight")
    if weight is not None and (not isinstance(weight, Tensor) or tuple(weight.shape) != (n_classes,)):
        raise ValueError(f"weight (class weights) must be a tensor of shape ({n_classes},), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")

    previous = target.__dict__.get(_STATE)
    original = previous.original if previous is not None else target.__dict__.get("forward", _MISSING)
    state = _State(kind, dict(loss_options), allowed_group_masks, return_logits, teacher_frame,
                   dict(fused_options or {}), original)
    original_callable = _original(target, state)
    target.__dict__[_STATE] = state
    target.__dict__["forward"] = types.MethodType(_patched_function(kind, inspect.signature(original_callable)),
                                                  target)
    return model


def unapply_vfm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vfm`: the model's forward is the original one again.

    Args:
        model: a model patched by :func:`apply_vfm` (or the PEFT model wrapping it).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` is not patched, or its forward was replaced after :func:`apply_vfm` (by a
            hook library, say), which restoring would silently undo.
    """
    target = _hf_model(model)
    state = target.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"unapply_vfm: this {type(target).__name__} is not patched by apply_vfm (nothing to undo)")
    current = target.__dict__.get("forward")
    if not getattr(getattr(current, "__func__", None), "_vfm_patched", False):
        raise ValueError(f"unapply_vfm: {type(target).__name__}.forward was replaced after apply_vfm by {current!r}; "
                         "remove that wrapper first")
    del target.__dict__[_STATE]
    if state.original is _MISSING:
        del target.__dict__["forward"]
    else:
        target.__dict__["forward"] = state.original
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply_vfm` patched ``model`` (or the base model of a PEFT ``model``)."""
    return _STATE in _hf_model(model).__dict__


# ------------------------------------------------------------------------------------------ forward --
def _original(model: nn.Module, state: _State):
    if state.original is _MISSING:
        return types.MethodType(type(model).forward, model)
    return state.original


def _patched_function(kind: str, original_signature: inspect.Signature):
    """A forward function for ``types.MethodType`` whose signature is the original's plus the batch keys."""
    impl = _causal_forward if kind == "causal" else _classification_forward

    def forward(self, *args, **kwargs):
        return impl(self, args, kwargs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    var_keyword = inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)
    for p in original_signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = p
        else:
            params.append(p)
    names = {p.name for p in params}
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in BATCH_KEYS if k not in names]
    forward.__signature__ = inspect.Signature(params + [var_keyword],
                                              return_annotation=original_signature.return_annotation)
    forward.__doc__ = (f"vfm-patched forward ({kind}): the original forward's arguments plus the batch keys "
                       f"{', '.join(BATCH_KEYS)}. See vfm.integrations.transformers.")
    forward._vfm_patched = True
    return forward


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


def _finish(output, return_dict: Optional[bool], model: nn.Module):
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if not return_dict and not isinstance(output, tuple):
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


def _causal_targets(labels: Optional[Tensor], shift_labels: Optional[Tensor], extras: Dict[str, Tensor],
                    lead_shape: tuple, state: _State, device: torch.device) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Targets and batch keys aligned with the rows of the hidden states / logits (``lead_shape``)."""
    ignore_index = state.options.get("ignore_index", -100)
    given = shift_labels if shift_labels is not None else labels
    if not isinstance(given, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(given).__name__}")
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
    if labels is None and shift_labels is None:
        _no_labels(extras)
        return _finish(_original(model, state)(**kw, return_dict=True), return_dict, model)
    if return_logits is None:
        return_logits = state.return_logits
    head = _plain_linear(model.get_output_embeddings())
    if model.training and not return_logits:
        if head is not None:
            output = _fused_causal_loss(model, kw, labels, shift_labels, extras, num_items, state, head)
            return _finish(output, return_dict, model)
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
    output = original(**kw, return_dict=True)
    logits = output.logits
    lead_shape = tuple(logits.shape[:-1])
    if labels.numel() != math.prod(lead_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits have shape {tuple(logits.shape)}")
    target = labels.to(logits.device).reshape(lead_shape)
    aligned = {}
    for key, value in extras.items():
        value = value.to(logits.device)
        trailing = 1 if key in ("teacher_logits", "allowed", "teacher_topk_indices", "teacher_topk_logprobs") else 0
        if value.numel() // max(1, math.prod(value.shape[value.dim() - trailing:])) != math.prod(lead_shape):
            raise ValueError(f"batch key {key!r} has shape {tuple(value.shape)}; its leading dims must match the "
                             f"labels {tuple(labels.shape)}")
        aligned[key] = value.reshape(lead_shape + tuple(value.shape[value.dim() - trailing:]))
    loss = knowledge_cross_entropy(logits, target, num_items_in_batch=_num_items(num_items, logits.device),
                                   **_loss_arguments(aligned, state, logits.device))
    return _finish(_with_loss(output, loss), return_dict, model)
