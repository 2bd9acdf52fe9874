"""AdaLoRA's rank-budget schedule, run automatically.

PEFT's AdaLoRA re-allocates ranks only when ``model.base_model.update_and_allocate(step)`` is
called after every optimizer step and before the gradients are zeroed; forgetting it silently
trains a fixed-rank adapter.  vfm runs it for you:

* :class:`AdaLoraScheduleCallback` - for the Transformers ``Trainer`` (``callbacks=[...]``).
* :func:`attach_schedule` - for hand-written loops: a post-step hook on the optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def find_adalora_model(model: torch.nn.Module):
    """Return the PEFT ``AdaLoraModel`` inside ``model`` (a PeftModel or the AdaLoraModel itself).

    Data-parallel wrappers that keep the model as ``.module`` (``DistributedDataParallel``,
    ``DataParallel``, as ``accelerator.prepare`` returns it on several devices) and
    ``torch.compile``'s ``_orig_mod`` are looked through.

    Raises:
        TypeError: ``model`` holds no AdaLoRA adapter.
    """
    try:
        from peft.tuners.adalora import AdaLoraModel
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise TypeError("AdaLoRA scheduling needs the peft package") from exc
    current = model
    for _ in range(8):  # wrappers of wrappers, but no endless chain
        for candidate in (current, getattr(current, "base_model", None)):
            if isinstance(candidate, AdaLoraModel):
                return candidate
        if not isinstance(current, torch.nn.Module):
            break
        inner = current._modules.get("module") or current._modules.get("_orig_mod")
        if inner is None:
            break
        current = inner
    raise TypeError(f"model must be a PEFT model with an AdaLoRA adapter, got {type(model).__name__}")


def attach_schedule(model: torch.nn.Module, optimizer: torch.optim.Optimizer, start_step: int = 0):
    """Call AdaLoRA's ``update_and_allocate`` after every ``optimizer.step()``.

    Args:
        model: a PEFT model with an AdaLoRA adapter.
        optimizer: the optimizer whose steps count as training steps (call ``zero_grad`` after
            ``step``, as usual: the allocator reads the gradients).  A wrapper that keeps the
            optimizer as ``.optimizer`` (Hugging Face accelerate's ``AcceleratedOptimizer``, for
            instance) is looked through: the hook goes on the optimizer inside, so only the steps
            it really takes count (not those skipped under gradient accumulation or by a grad scaler).
        start_step: the step number of the next ``optimizer.step()`` (when resuming).

    Returns:
        The hook handle; ``handle.remove()`` detaches the schedule.

    Raises:
        TypeError: ``model`` holds no AdaLoRA adapter, or ``optimizer`` is no torch optimizer.
        ValueError: ``start_step`` is negative or not an int.
    """
    ada = find_adalora_model(model)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
    inner = _hookable(optimizer)
    state = {"step": start_step}

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ada.update_and_allocate(state["step"])
        state["step"] += 1

    return inner.register_step_post_hook(hook)


def _hookable(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that takes the steps: ``optimizer`` itself, or the one a wrapper keeps as
    ``.optimizer`` (the wrapper's own step hooks would never fire, or fail: it skips Optimizer.__init__)."""
    current = optimizer
    for _ in range(8):  # wrappers of wrappers, but no endless chain
        if isinstance(current, torch.optim.Optimizer) and "_optimizer_step_post_hooks" in vars(current):
            return current
        current = getattr(current, "optimizer", None)
        if current is None:
            break
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or a wrapper holding one as .optimizer, got "
                    f"{type(optimizer).__name__}")


def _callback_class() -> Optional[type]:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover
        return None

    class AdaLoraScheduleCallback(TrainerCallback):
        """Transformers ``Trainer`` callback running AdaLoRA's budget schedule each step."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise ValueError("AdaLoraScheduleCallback needs the Trainer's model")
            find_adalora_model(model).update_and_allocate(state.global_step)
            return control

    return AdaLoraScheduleCallback


def __getattr__(name: str) -> Callable:
    if name == "AdaLoraScheduleCallback":
        cls = _callback_class()
        if cls is None:
            raise ImportError("AdaLoraScheduleCallback needs the transformers package")
        globals()[name] = cls
        return cls
    raise AttributeError(name)
