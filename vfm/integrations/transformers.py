"""Train Hugging Face Transformers models on vfm's losses: :func:`apply_vfm` / :func:`unapply_vfm`.

``apply_vfm(model, **loss_options)`` patches *one model instance* (never its class: two models in one
process stay independent) so that its ``forward(..., labels=...)`` computes vfm's loss:

* **Causal LMs** (:data:`CAUSAL_LM_CLASSES`: the Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3, Phi/Phi3,
  OLMo2 and Starcoder2 ``*ForCausalLM`` classes, whose forward was read in transformers 5.x): in training
  mode the loss is :func:`vfm.functional.fused_linear_knowledge_cross_entropy` of the final hidden
  states and the LM head's weight (and bias), so the ``[tokens, vocab]`` logits are never materialised
  and ``outputs.logits`` is ``None`` (with ``return_dict=False`` the tuple is ``(loss, None, cache, ...)``,
  transformers' positions).  Logits are still computed and returned in eval mode
  (``model.eval()``, e.g. the Trainer's evaluation loop), when no labels are given (generation), when
  the call passes ``return_logits=True`` (or ``apply_vfm(..., return_logits=True)``), and when the LM
  head is not a plain ``nn.Linear`` (a PEFT LoRA layer on the head, a forward hook on it: logged
  once); the loss is then :func:`vfm.functional.knowledge_cross_entropy` of those logits.  Both paths
  give the same numbers.  Transformers' semantics are kept: ``labels`` are shifted inside the model
  (``shift_labels=`` is used as given), ``ignore_index`` (-100; set it with ``apply_vfm(model,
  ignore_index=...)``: a different forward ``ignore_index=`` is a ValueError) rows do not count, the Trainer's
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

With ``transformers.Trainer``: call ``apply_vfm`` *before* creating the Trainer (it reads the forward
signature once).  The patched ``forward`` lists the batch keys in its signature, so the Trainer keeps
those dataset columns even with ``remove_unused_columns=True`` (the default; ``False`` works too);
its default collator stacks them (a custom collator must too).  The forward takes ``**kwargs``, so
the Trainer passes ``num_items_in_batch`` and does not divide the loss by the accumulation steps
again.  Keep ``ignore_index=-100`` with the Trainer (it counts ``labels != -100``).  The Trainer's
``label_smoothing_factor`` takes the labels away from the model (its own smoother then needs the
logits): use ``apply_vfm(model, label_smoothing=...)`` instead.  Evaluation runs in eval mode, so
``compute_metrics`` gets logits.  Batches without labels must not carry vfm batch keys (ValueError).

``unapply_vfm`` restores the original ``forward`` exactly (an instance-level ``forward`` that was
there before, e.g. a hook library's, comes back).  PEFT models (and :func:`vfm.peft.accelerate`'d
ones) are patched on their base model; the LM head under the wrapper is used as it runs: PEFT's
``modules_to_save`` copy when that is active, else the original.  A LoRA adapter *on* the LM head
has no single weight to fuse, so that case takes the logits path.  A user-set ``loss_function`` on
the model is bypassed while patched.

Example::

    model = AutoModelForCausalLM.from_pretrained(...)
    apply_vfm(model, kd_weight=0.5, temperature=2.0)
    out = model(input_ids=ids, labels=ids, teacher_logits=teacher(ids).logits)
    out.loss.backward()        # out.logits is None: no [B, T, V] tensor was made
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from vfm.integrations._hf_forward import (_MISSING, _REPLICATE, _STATE, BATCH_KEYS, _Bound, _forward_entry,
                                         _PatchedForward, _replicate_entry, _State)
from vfm.ops.kce_api import knowledge_cross_entropy

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
                     "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
                     "Olmo2ForCausalLM", "Starcoder2ForCausalLM")

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
            (e.g. ``block_rows``, ``grad_accum_dtype``, ``grad_filter``).
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
    target.__dict__[_STATE] = state
    target.__dict__["forward"] = _PatchedForward(_forward_entry, target)
    if _REPLICATE not in target.__dict__:  # nn.DataParallel (the Trainer on several GPUs) copies __dict__
        target.__dict__[_REPLICATE] = _Bound(_replicate_entry, target)
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
    if not isinstance(current, _PatchedForward) or current.__self__ is not target:
        raise ValueError(f"unapply_vfm: {type(target).__name__}.forward was replaced after apply_vfm by {current!r}; "
                         "remove that wrapper first")
    del target.__dict__[_STATE]
    if getattr(target.__dict__.get(_REPLICATE), "__func__", None) is _replicate_entry:
        del target.__dict__[_REPLICATE]
    if state.original is _MISSING:
        del target.__dict__["forward"]
    else:
        target.__dict__["forward"] = state.original
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply_vfm` patched ``model`` (or the base model of a PEFT ``model``)."""
    return _STATE in _hf_model(model).__dict__
