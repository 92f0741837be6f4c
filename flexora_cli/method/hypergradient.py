"""The α step's gradient: how the validation loss depends on α̂ through the LoRA weights.

The search alternates a LoRA step w → w' = U(w, g(w, α)) (clipped AdamW on a training batch) with
an α step on a validation batch. The hypergradient of L_val(w'(α), α) is

    ∇α L_val(w', α)  +  (∂g/∂α)ᵀ Jclipᵀ Dᵀ ∇w' L_val(w', α)

where D = ∂U/∂g is the AdamW step's Jacobian (diagonal) and Jclip that of gradient clipping.

- `first_order` keeps only the first term (K = 0 of the paper's unrolled differentiation; the
  authors' code). The other term is the effect of α on the LoRA step just taken.
- `darts` adds the second term for the last LoRA step (K = 1) as DARTS does (Liu et al. 2019, eqs.
  7–8): the mixed second derivative times u = Jclip D ∇w' L_val is a central finite difference of
  ∇α L_train at w ± εu. D is the exact Jacobian of our AdamW step, not SGD's −lr. Two extra
  forward/backward passes, no double backward: works with fused attention, activation
  checkpointing, QLoRA and DDP.
- `unrolled` differentiates through the last K LoRA steps exactly (torch.func.functional_call
  and a double backward through the functional AdamW step). It replays each step's batch, dropout
  masks (RNG state) and α, so its trajectory is the one the search took. Eager attention only; one
  process; no activation checkpointing, quantization or fp16.

Each object is told about the LoRA step (before/after) and then corrects α̂'s gradient, which the α
pass (θ fixed, dropout off) has just left in `.grad`. The names, the rules each one sets on the
other settings and on the launch, and the name → class table (HYPERGRADIENTS) are all here.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flexora_cli.data.collate import Collated, MicroBatch
from flexora_cli.errors import ConfigError
from flexora_cli.method.gates import LayerGates
from flexora_cli.settings import one_of
from flexora_cli.step import TrainStep

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coef = max_norm / (norm + 1e-6)


class FirstOrder:
    """∇α L_val at the current LoRA weights: what the α pass already computed."""

    def __init__(
        self,
        train_step: TrainStep,
        lora: list[nn.Parameter],
        gates: LayerGates,
        optimizer,
        max_grad_norm: float,
    ):
        self.train_step, self.lora, self.gates, self.max_grad_norm = train_step, lora, gates, max_grad_norm
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW inside accelerate's
        self.device = gates.alpha_hat.device

    @classmethod
    def for_search(cls, train_step: TrainStep, lora, gates: LayerGates, optimizer, model: nn.Module, search):
        """The hypergradient for a search with settings `search` over the unwrapped `model`."""
        return cls(train_step, lora, gates, optimizer, search.max_grad_norm)

    def before_lora_step(self, train: Collated) -> None:
        """Called before the LoRA step on `train` (at this point the weights are w)."""

    def after_lora_step(self, grad_norm: torch.Tensor) -> None:
        """Called after the LoRA update (weights w'); `.grad` still holds the clipped gradient the
        optimizer stepped with, `grad_norm` its norm before clipping."""

    def correct(self, train: Collated, val: Collated) -> None:
        """Turn the α pass's ∇α L_val (in α̂'s .grad) into this hypergradient."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- shared by the second-order variants ----------------------------------------------------

    def _rng_snapshot(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextlib.contextmanager
    def _replayed_rng(self, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run with the RNG as it was at `snapshot` (same dropout masks), then restore it."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.set_rng_state(snapshot["cpu"])
            if "cuda" in snapshot:
                torch.cuda.set_rng_state(snapshot["cuda"], self.device)
            yield

    def _adam_hyperparameters(self) -> tuple[float, float, float, float, float]:
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        return float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"]


class Darts(FirstOrder):
    """+ the last LoRA step's term, by a central finite difference (DARTS) with AdamW's exact
    diagonal Jacobian and clipping's rank-one one."""

    def before_lora_step(self, train: Collated) -> None:
        self.rng = self._rng_snapshot()
        self.weights_before = [p.detach().clone() for p in self.lora]

    def after_lora_step(self, grad_norm: torch.Tensor) -> None:
        self.clipped = [p.grad.detach().clone() for p in self.lora]
        self.grad_norm = grad_norm.detach()
        self.lr = self._adam_hyperparameters()[0]  # before the schedule moves it

    def correct(self, train: Collated, val: Collated) -> None:
        val_grads = [p.grad.detach() for p in self.lora]  # ∇w' L_val, from the α pass
        u = clip_jacobian_times(
            self.clipped, self.grad_norm, self.max_grad_norm, self._adam_jacobian_times(val_grads)
        )
        epsilon = 0.01 / torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in u]))
        epsilon = torch.nan_to_num(epsilon, posinf=0.0)  # u = 0: no second term
        direct = self.gates.alpha_hat.grad.detach().clone()
        weights_after = [p.detach().clone() for p in self.lora]
        sides = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for p, w, step in zip(self.lora, self.weights_before, u, strict=True):
                    p.copy_(w + sign * epsilon * step)
                sides.append(self._train_alpha_gradient(train))
            for p, w in zip(self.lora, weights_after, strict=True):
                p.copy_(w)
        mixed = torch.where(epsilon > 0, (sides[0] - sides[1]) / (2 * epsilon.clamp_min(1e-30)), 0.0)
        self.gates.alpha_hat.grad = direct + mixed

    def _train_alpha_gradient(self, train: Collated) -> torch.Tensor:
        """∇α L_train at the current weights, with the LoRA step's dropout masks."""
        self.gates.alpha_hat.grad = None
        with torch.enable_grad(), self._replayed_rng(self.rng):
            self.train_step.forward_backward(train, count_padding=False)
        return self.gates.alpha_hat.grad.detach().clone()

    def _adam_jacobian_times(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """D ⊙ v for each LoRA tensor: the derivative of the AdamW update w' w.r.t. the (clipped)
        gradient g it used, from the optimizer's state after the step."""
        _, beta1, beta2, eps, _ = self._adam_hyperparameters()
        # one count for all (a float32 device tensor when fused); the corrections in float64, as
        # the optimizer's kernels compute them
        t = self.optimizer.state[self.lora[0]]["step"].double()
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t
        c1, c2 = (1 - beta1) / correction1, (1 - beta2) / correction2
        out = []
        for p, g, v in zip(self.lora, self.clipped, vectors, strict=True):
            state = self.optimizer.state[p]
            m_hat, s = state["exp_avg"] / correction1, (state["exp_avg_sq"] / correction2).sqrt()
            # d/dg [m̂/(s+eps)] = c1/(s+eps) − m̂/(s+eps) · c2·g/s / (s+eps); the second term is 0 at
            # s = 0 (then g = 0); written as bounded factors (|c2·g/s| ≤ √c2) so nothing overflows
            through_s = torch.where(s > 0, m_hat / (s + eps) * (c2 * g / s.clamp_min(1e-30)) / (s + eps), 0.0)
            out.append(-self.lr * (c1 / (s + eps) - through_s) * v)
        return out


def clip_jacobian_times(
    clipped: list[torch.Tensor], norm: torch.Tensor, max_norm: float, vectors: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Jclip x for global-norm clipping g_c = coef·g, coef = M/(‖g‖+1e-6) when below 1:
    Jclip x = coef·x − g_c (g_c·x) / (‖g‖·M) (symmetric); the identity when nothing was clipped."""
    if max_norm <= 0:
        return vectors
    coef = max_norm / (norm + CLIP_EPS)
    clipped_now = coef < 1
    dot = sum((g * x).sum() for g, x in zip(clipped, vectors, strict=True))
    scale = torch.where(clipped_now, coef, torch.ones_like(coef))
    rank_one = torch.where(clipped_now, dot / (norm * max_norm), torch.zeros_like(dot))
    return [scale * x - rank_one * g for g, x in zip(clipped, vectors, strict=True)]


class Unrolled(FirstOrder):
    """Exact differentiation of L_val through the last K LoRA steps (K = 0: the direct gradient)."""

    def __init__(
        self, train_step, lora, gates, optimizer, max_grad_norm: float, model: nn.Module, steps: int
    ):
        super().__init__(train_step, lora, gates, optimizer, max_grad_norm)
        self.model, self.steps, self.dropout_off = model, steps, DropoutOff(model)
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [names[id(p)] for p in lora]
        self.alpha_name = names[id(gates.alpha_hat)]
        self.window: deque[dict[str, Any]] = deque(maxlen=max(steps, 1))

    @classmethod
    def for_search(cls, train_step: TrainStep, lora, gates: LayerGates, optimizer, model: nn.Module, search):
        return cls(train_step, lora, gates, optimizer, search.max_grad_norm, model, search.unroll_steps)

    def before_lora_step(self, train: Collated) -> None:
        if self.steps == 0:
            return
        states = [self.optimizer.state.get(p, {}) for p in self.lora]
        self.window.append({
            "batch": train,
            "rng": self._rng_snapshot(),
            "alpha": self.gates.alpha_hat.detach().clone(),
            "weights": [p.detach().clone() for p in self.lora],
            "exp_avg": [s["exp_avg"].clone() if s else torch.zeros_like(p) for s, p in zip(states, self.lora)],
            "exp_avg_sq": [s["exp_avg_sq"].clone() if s else torch.zeros_like(p) for s, p in zip(states, self.lora)],
            "step": states[0]["step"].double() if states[0] else torch.zeros((), dtype=torch.float64, device=self.device),
        })  # fmt: skip

    def after_lora_step(self, grad_norm: torch.Tensor) -> None:
        if self.steps:
            self.window[-1]["lr"] = self._adam_hyperparameters()[0]

    def correct(self, train: Collated, val: Collated) -> None:
        alpha = self.gates.alpha_hat
        with torch.enable_grad():
            weights = self._unroll(alpha)
            val_loss = self._loss(weights, alpha, val, replay=None)
            (gradient,) = torch.autograd.grad(val_loss, alpha)
        alpha.grad = gradient.detach()

    def _unroll(self, alpha: torch.Tensor) -> list[torch.Tensor]:
        """The LoRA weights after replaying the window's steps from its first state, as functions
        of α (each step's α is the current α plus that step's constant offset)."""
        if not self.window:
            return [p.detach() for p in self.lora]
        first = self.window[0]
        weights = [w.requires_grad_() for w in (w.clone() for w in first["weights"])]
        exp_avg, exp_avg_sq, t = list(first["exp_avg"]), list(first["exp_avg_sq"]), first["step"]
        _, beta1, beta2, eps, decay = self._adam_hyperparameters()
        for entry in self.window:
            at = alpha + (entry["alpha"] - alpha.detach())
            loss = self._loss(weights, at, entry["batch"], replay=entry["rng"])
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            grads = clip(grads, self.max_grad_norm)
            t = t + 1  # not in place: t is the window's own tensor
            exp_avg = [beta1 * m + (1 - beta1) * g for m, g in zip(exp_avg, grads)]
            exp_avg_sq = [beta2 * v + (1 - beta2) * g * g for v, g in zip(exp_avg_sq, grads)]
            step_size = entry["lr"] / (1 - beta1**t)
            weights = [
                w * (1 - entry["lr"] * decay) - step_size * m / (safe_sqrt(v / (1 - beta2**t)) + eps)
                for w, m, v in zip(weights, exp_avg, exp_avg_sq)
            ]
        return weights

    def _loss(
        self, weights: list[torch.Tensor], alpha: torch.Tensor, batch: Collated, replay
    ) -> torch.Tensor:
        """The step's mean answer loss of `batch` with the given LoRA weights and α̂ (dropout off
        unless `replay` gives the RNG state of a training step)."""
        params = dict(zip(self.names, weights)) | {self.alpha_name: alpha}
        total = 0.0
        context = self._replayed_rng(replay) if replay is not None else self.dropout_off()
        with context:
            for micro in batch.micro_batches:
                micro = micro.to(self.device)
                out = torch.func.functional_call(self.model, params, kwargs=micro.model_inputs())
                total = total + out * (micro.weight / batch.total_tokens)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"window": [entry | {"batch": batch_state(entry["batch"])} for entry in self.window]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        for entry in state["window"]:
            moved = {k: _to(v, self.device) for k, v in entry.items() if k not in ("batch", "rng")}
            self.window.append(moved | {"rng": entry["rng"], "batch": batch_from_state(entry["batch"])})


def clip(grads: tuple[torch.Tensor, ...], max_norm: float) -> list[torch.Tensor]:
    """clip_grad_norm_ as a differentiable function."""
    if max_norm <= 0:
        return list(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    return [g * coef for g in grads]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt whose derivative at 0 is 0 instead of inf·0 = NaN (an Adam moment that is exactly 0,
    e.g. LoRA A's at the first step, where B = 0; the update's true derivative there is the
    numerator's alone)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def batch_state(batch: Collated) -> dict[str, Any]:
    """A Collated as plain tensors and numbers (checkpoints load with weights_only)."""
    micro = [{f: getattr(m, f) for f in m.__dataclass_fields__} for m in batch.micro_batches]
    return {
        "micro_batches": micro,
        "total_tokens": batch.total_tokens,
        "rows": batch.rows,
        "tokens": batch.tokens,
    }


def batch_from_state(state: dict[str, Any]) -> Collated:
    return Collated(**(state | {"micro_batches": [MicroBatch(**m) for m in state["micro_batches"]]}))


class DropoutOff:
    """No dropout in a pass (the α pass, as the authors' code, so the hypergradient is not noisy)
    while activation checkpointing stays on: every module goes to eval mode except the
    checkpointed layers, whose `training` flag is what turns their checkpointing on."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if not getattr(m, "gradient_checkpointing", False)]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        was = [m.training for m in self.modules]
        for m in self.modules:
            m.training = False
        try:
            yield
        finally:
            for m, training in zip(self.modules, was):
                m.training = training


HYPERGRADIENTS: dict[str, type[FirstOrder]] = {
    "first_order": FirstOrder,
    "darts": Darts,
    "unrolled": Unrolled,
}
"""search.hypergradient's names and the class each one names."""


def make_hypergradient(
    kind: str, train_step: TrainStep, lora, gates: LayerGates, optimizer, model: nn.Module, search
) -> FirstOrder:
    """The hypergradient `search.hypergradient` names, for the unwrapped search module `model`;
    an unknown name is an error, never a silent first-order search."""
    if kind not in HYPERGRADIENTS:
        raise ConfigError(_name_problems(kind)[0])
    return HYPERGRADIENTS[kind].for_search(train_step, lora, gates, optimizer, model, search)


def _name_problems(kind: str) -> list[str]:
    return one_of("search.hypergradient", kind, tuple(HYPERGRADIENTS))


def setting_problems(settings) -> list[str]:
    """search.hypergradient's rules on the other settings: the second-order variants need unscaled
    gradients, and unrolled a twice-differentiable model (eager attention, no checkpointing, no
    quantization, not compiled). Checked with every other setting when the config loads (config.load)."""
    kind = settings.search.hypergradient
    if kind not in HYPERGRADIENTS:
        return _name_problems(kind)
    problems = []
    if kind != "first_order" and settings.precision == "fp16":
        problems.append(f"search.hypergradient={kind}: not with precision=fp16 (scaled gradients); use bf16")
    if kind == "unrolled":
        needs = {
            "model.attn_implementation=eager": settings.model.attn_implementation == "eager",
            "gradient_checkpointing=false": not settings.gradient_checkpointing,
            "model.quantization=none": settings.model.quantization == "none",
            "compile=false": not settings.compile,  # compiled backwards are not differentiable again
        }
        missing = [fix for fix, ok in needs.items() if not ok]
        if missing:
            problems.append(
                f"search.hypergradient=unrolled differentiates through the LoRA steps (a double "
                f"backward), which needs {', '.join(missing)}; set them, or use search.hypergradient=darts"
            )
    return problems


def check_launch(kind: str, engine) -> None:
    """Refuse the hypergradients this launch cannot compute (FSDP shards, several processes)."""
    if kind != "first_order" and engine.shards_parameters:
        raise ConfigError(
            f"search.hypergradient={kind} needs each process to hold whole LoRA tensors, not FSDP "
            f"shards; set distributed=ddp, or use search.hypergradient=first_order"
        )
    if kind == "unrolled" and engine.num_processes > 1:
        raise ConfigError(
            "search.hypergradient=unrolled runs on one process (its replayed steps are not "
            "all-reduced); launch one process, or use search.hypergradient=darts, which runs under DDP"
        )
