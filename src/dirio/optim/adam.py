"""Adam and AMSGrad with ``torch.optim.Adam``'s multi-tensor arithmetic, without its compiler hooks.

``torch.optim.Adam`` imports the compiler (``torch._dynamo``, about 1 s of one core) when its
first parameter group is added and again at every step (a graph break for ``torch.compile``).
Nothing in dirio compiles an optimiser step, and on the 2-core development CPU that import, done
while the coarse pyramid levels run, made ``dirio register``'s first level 1.2 s slower (2.0 s
against 0.8 s on the 160 x 192 x 224 brain pair). :class:`Adam` does the same update with the same
``torch._foreach_*`` calls in the same order as PyTorch's ``foreach`` path (non-capturable, not
maximising, weight decay as an L2 term added to the gradient), so a registration's field is the
same to the last bit (tested against ``torch.optim.Adam`` over many steps).

The update of each parameter ``p`` with gradient ``g`` at step ``t`` (``t`` counts from 1)::

    g      <- g + weight_decay * p                 (when weight_decay != 0)
    m      <- m + (1 - beta1) (g - m)              (lerp)
    v      <- beta2 v + (1 - beta2) g^2
    v_max  <- max(v_max, v)                        (AMSGrad only; used in place of v below)
    p      <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

It keeps the part of the ``torch.optim.Optimizer`` interface that dirio uses: ``param_groups``
(dicts whose ``lr`` the caller may change between steps, with any extra keys kept), ``state``,
``step()``, ``zero_grad()``, and ``state_dict()`` / ``load_state_dict()`` in PyTorch's layout, so a
state saved by either optimiser loads into the other.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["Adam"]

class Adam:
    """Adam (Kingma & Ba), or AMSGrad with ``amsgrad=True``; see the module docstring.

    Args:
        params: tensors, or parameter groups (dicts with ``params`` and optionally their own
            hyperparameters and extra keys such as a transform's ``lr_divisor``).
        lr: learning rate (>= 0).
        betas: decay rates of the first and second moments, each in ``[0, 1)``.
        eps: added to the root of the second moment (>= 0).
        weight_decay: L2 term added to the gradient (>= 0).
        amsgrad: divide by the running maximum of the second moment.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                         "amsgrad": bool(amsgrad)}
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        seen: set[int] = set()
        for group in groups:
            tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
            if any(id(p) in seen for p in tensors):
                raise ValueError("some parameters appear in more than one parameter group")
            seen.update(id(p) for p in tensors)
            self.param_groups.append({**self.defaults, **group, "params": tensors})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every parameter's gradient (set it to None, or to zeros with ``set_to_none=False``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def _state_of(self, p: torch.Tensor, amsgrad: bool) -> dict[str, torch.Tensor]:
        """The moments of ``p``, created at its first step (the step count a float32 CPU scalar, as PyTorch's)."""
        state = self.state.get(p)
        if state is None:
            state = {"step": torch.tensor(0.0, dtype=torch.float32),
                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state[p] = state
        return state

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            by_device: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Adam does not support sparse gradients")
                    by_device.setdefault((p.device, p.dtype), []).append(p)
            for params in by_device.values():
                _update(params, [self._state_of(p, group["amsgrad"]) for p in params], group)

    # --- saving and loading, in torch.optim's layout -------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: moments}, "param_groups": [hyperparameters with "params": indices]}``,
        parameters numbered in group order (PyTorch's layout; the tensors are not copied)."""
        index: dict[int, int] = {}  # a parameter is in one group only (checked when the groups are made)
        groups = []
        for group in self.param_groups:
            numbers = list(range(len(index), len(index) + len(group["params"])))
            index.update(zip((id(p) for p in group["params"]), numbers))
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": numbers})
        state = {index[id(p)]: dict(moments) for p, moments in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the moments and hyperparameters of a :meth:`state_dict` (this class's or
        ``torch.optim.Adam``'s) for the same parameter layout; moments are moved to each parameter's
        device and floating dtype, the step counts stay float32 on the CPU."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        by_number = {number: p for s, g in zip(saved_groups, self.param_groups)
                     for number, p in zip(s["params"], g["params"])}
        self.state = {}
        for number, moments in state_dict["state"].items():
            p = by_number[int(number)]
            self.state[p] = {key: (value.detach().to(dtype=torch.float32, device="cpu").clone() if key == "step"
                                   else value.detach().to(device=p.device, dtype=p.dtype).clone())
                             for key, value in moments.items()}
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])


def _update(params: list[torch.Tensor], states: list[dict[str, torch.Tensor]], group: dict[str, Any]) -> None:
    """The update of the module docstring for parameters of one device and dtype, as PyTorch's
    multi-tensor Adam computes it (the same calls in the same order)."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay, amsgrad = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"]
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads
    counts = [step.item() for step in steps]
    step_sizes = [(lr / (1 - beta1 ** t)) * -1 for t in counts]
    correction2_roots = [(1 - beta2 ** t) ** 0.5 for t in counts]
    if amsgrad:
        maxima = [s["max_exp_avg_sq"] for s in states]
        torch._foreach_maximum_(maxima, exp_avg_sqs)
        denominators = torch._foreach_sqrt(maxima)
    else:
        denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, correction2_roots)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)
