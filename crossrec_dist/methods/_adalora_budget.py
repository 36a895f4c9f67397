"""AdaLoRA's rank budget in the engine's update, as PEFT's own training loop runs it.

PEFT's loop is ``backward; optimizer.step(); model.base_model.update_and_allocate(step);
zero_grad()``: importance scores from the gradients, then the *updated* singular values of the
least important ranks are zeroed, so the weights every step leaves (the ones validated, checkpointed
and saved) keep to the budget. Two things stop us calling it that way under DeepSpeed:

* ZeRO-1/2 keep the reduced gradients in their own partitions (``param.grad`` is None after the
  backward) and free them in the step. They are read after the backward with
  ``deepspeed.utils.safe_get_full_grad`` (which assembles each one, a collective: every rank reads
  every parameter in the same order) and handed back to PEFT as ``.grad`` after the step.
* ZeRO-1/2 update an fp32 master copy and copy it into the model's weights after each step; a mask
  written into the model's weights alone is undone by the next step. The pruned singular values are
  zeroed in the master copy too (``deepspeed.utils.safe_set_full_fp32_param``; fp32 ZeRO-0 and DDP
  have none, so nothing to do). fp16 (loss-scaled gradients, and a ZeRO-0 master without the
  mapping these helpers use) is refused upstream.

Clipping: without DeepSpeed the gradients read are clipped already; DeepSpeed clips inside its
step, and the engine passes the factor it applied, so every launch form scores the same gradients.

ZeRO-3 partitions the weights themselves, which PEFT's masking writes in place: refused upstream.
"""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param
from peft.tuners.adalora.layer import RankAllocator
from peft.tuners.adalora.model import AdaLoraModel

ADAPTER = "default"


def _is_adapter_param(name: str) -> bool:
    """The parameters PEFT's RankAllocator scores (its own test: "lora_" and the adapter's name)."""
    return "lora_" in name and ADAPTER in name


def _deepspeed_managed(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")


class AdaLoraBudget:
    """Runs PEFT's ``update_and_allocate`` for an AdaLoRA adapter, plain or inside a mixed model.

    ``read_gradients(step)`` after the backward, ``allocate(step)`` after the optimizer step."""

    def __init__(self, peft_model, mixed: bool):
        # PEFT's AdaLoraModel, or the same schedule for a mixed model (whose tuner has no allocator)
        self.schedule = MixedRankAllocation(peft_model) if mixed else peft_model.base_model
        self.params = [(n, p) for n, p in self.schedule.model.named_parameters()
                       if _is_adapter_param(n) and p.requires_grad]
        self._grads: dict[str, torch.Tensor] = {}

    @property
    def config(self):
        return self.schedule.peft_config[ADAPTER]

    def read_gradients(self, step: int) -> None:
        """Keep the gradients PEFT's importance scores will read in ``allocate(step)``: none from the
        final-budget step on, where PEFT only masks with the pattern it has (no copies, and under
        ZeRO-1/2 no collectives, for the last ``tfinal`` steps)."""
        grads = {}
        if step >= self.config.total_step - self.config.tfinal:
            self._grads = grads
            return
        for name, p in self.params:
            if _deepspeed_managed(p):
                g = safe_get_full_grad(p)
            else:
                g = p.grad
            if g is not None:
                grads[name] = g.detach().clone()   # ZeRO-0's zero_grad may zero p.grad in place
        self._grads = grads

    def allocate(self, step: int, grad_scale: float = 1.0) -> None:
        """PEFT's budget step on the gradients ``read_gradients`` kept, times ``grad_scale`` (what
        DeepSpeed's clipping applied after they were read), lent to PEFT as ``.grad``."""
        own = {}
        for name, p in self.params:
            if name in self._grads:
                own[name] = p.grad
                g = self._grads[name]
                p.grad = g if grad_scale == 1.0 else g * grad_scale
        try:
            self.schedule.update_and_allocate(step)
        finally:
            for name, p in self.params:
                if name in own:
                    p.grad = own[name]
            self._grads = {}
        self._prune_master_copies()

    def _prune_master_copies(self) -> None:
        """Zero, in DeepSpeed's fp32 master copy, the singular values PEFT zeroed in the weights. Only
        those: writing the weights back whole would round the master to bf16 every step under bf16.
        (Reads and writes are per parameter in one order on every rank: the read is a collective.)"""
        for name, p in self.params:
            if "lora_E" in name and _deepspeed_managed(p):
                pruned = p.detach() == 0      # the same on every rank (replicated weights): so is the skip
                if bool(pruned.any()):
                    master = safe_get_full_fp32_param(p)
                    safe_set_full_fp32_param(p, master.masked_fill(pruned.to(master.device), 0.0))


class MixedRankAllocation:
    """AdaLoRA's budget schedule for the AdaLoRA adapter of a mixed model, whose tuner has no rank
    allocator: PEFT's own ``AdaLoraModel.update_and_allocate`` run on the fields it reads, with PEFT's
    ``RankAllocator`` over the wrapped model (so rank_pattern keys are plain AdaLoRA's)."""

    trainable_adapter_name = ADAPTER

    def __init__(self, peft_model):
        self.model = peft_model.base_model.model
        self.peft_config = peft_model.peft_config
        self.rankallocator = RankAllocator(self.model, self.peft_config[ADAPTER], ADAPTER)

    def update_and_allocate(self, step: int) -> None:
        AdaLoraModel.update_and_allocate(self, step)
