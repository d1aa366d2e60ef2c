"""Conditional instance normalisation for the networks nnU-Net plans.

Two conditions, one mechanism:

* **resolution FiLM** (:class:`FiLMInstanceNorm`): ``(gamma + gamma_r) * xhat + (beta + beta_r)`` where
  ``gamma``, ``beta`` are the layer's usual affine parameters and ``(gamma_r, beta_r) = MLP(log2 spacing)``,
  a small MLP per layer of the case's original voxel spacing (mm, array order). The MLP's last layer starts
  at zero, so the network starts equal to the unconditioned one.
* **cohort-conditioned IN, SCIN** (:class:`CohortInstanceNorm`): one ``(gamma, beta)`` pair per cohort slot,
  every slot initialised with the layer's own parameters; a sample uses its cohort's pair. Each slot is its
  own ``nn.Parameter``, so a slot can be frozen or trained alone (norm-only fine-tuning of one cohort);
  only the slots used by the current batch enter the graph, so the others receive no gradient at all
  (under DDP, ``ddp_safe``, every slot enters the graph and unused ones get an exact zero gradient, as
  DDP requires every parameter to take part in each step).

:func:`condition_network` replaces every ``nn.InstanceNorm1d/2d/3d`` of a built network (nnU-Net's plain
and residual-encoder U-Nets, or anything else built from torch's instance norms) in place and attaches a
:class:`ConditionState` as ``network.ext_condition``. The condition is set from outside the forward pass
(the trainer per batch from the case identifiers, our predictor per case) with
``network.ext_condition.set(tensor)``: shape ``(B, 3)`` float spacings for FiLM, ``(B,)`` long cohort
slots for SCIN (``B`` = 1 is broadcast over the batch). A conditioned layer whose condition was never set
raises ``RuntimeError``: a conditioned model can never silently run unconditioned.

SCIN models carry their cohort table (slot -> cohort name) in the state dict
(``ext_condition.cohort_names``), so checkpoints, exported zips and ``-pretrained_weights`` keep it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NAME_BYTES = 64
KINDS = ("spacing", "cohort")


class ConditionState(nn.Module):
    """The current condition of one network (not a parameter) and, for cohorts, the cohort table."""

    def __init__(self, kind: str, n_cohorts: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "cohort" and n_cohorts < 1:
            raise ValueError(f"a cohort-conditioned network needs at least one cohort slot, got {n_cohorts}")
        self.kind = kind
        self.n_cohorts = n_cohorts
        self.value: torch.Tensor | None = None
        self._on_device: dict = {}
        # under DDP every parameter must take part in every step: all cohort slots enter the graph (unused
        # ones get an exact zero gradient) instead of only the batch's slots
        self.ddp_safe = False
        # marks a conditioned model in its state dict (``ext_condition.kind_code``: 1 spacing, 2 cohort)
        self.register_buffer("kind_code", torch.tensor([KINDS.index(kind) + 1], dtype=torch.uint8))
        if kind == "cohort":
            self.register_buffer("cohort_names", torch.zeros(n_cohorts, NAME_BYTES, dtype=torch.uint8))

    # --- current condition -------------------------------------------------------------------------------
    def set(self, value: torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if self.kind == "spacing":
            if value.ndim != 2 or value.shape[1] != 3 or not torch.is_floating_point(value):
                raise ValueError(f"a spacing condition is a float tensor (B, 3), got {tuple(value.shape)} {value.dtype}")
            if not bool((value > 0).all()):
                raise ValueError(f"voxel spacings must be positive, got {value.tolist()}")
        else:
            if value.ndim != 1 or value.dtype != torch.long:
                raise ValueError(f"a cohort condition is a long tensor (B,) of slots, got {tuple(value.shape)} {value.dtype}")
            slots = value.tolist()
            if any(v < 0 or v >= self.n_cohorts for v in slots):
                raise ValueError(f"cohort slots must be in [0, {self.n_cohorts}), got {slots}")
            # the slots used by this batch, known on the host: only their parameters enter the graph, so
            # unused cohorts get no gradient at all (no weight decay or momentum either)
            self.used_slots = sorted(set(slots))
            self.local_index = torch.tensor([self.used_slots.index(v) for v in slots], dtype=torch.long)
        self.value = value
        self._on_device = {}  # per-device copies, made once per condition (not once per norm layer)

    def clear(self) -> None:
        self.value = None
        self._on_device = {}

    def _device_copy(self, name: str, tensor: torch.Tensor, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = tensor.to(device, non_blocking=True)
        return self._on_device[key]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """log2 of the spacing condition on ``x``'s device (FiLM's MLP input)."""
        v = self.get(x)
        key = ("log2", str(x.device))
        if key not in self._on_device:
            self._on_device[key] = torch.log2(v.float())
        return self._on_device[key]

    def slot_index(self, x: torch.Tensor) -> torch.Tensor:
        return self._device_copy("local_index", self.local_index, x.device)

    def get(self, x: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(
                f"this network's instance norms are conditioned on the {self.kind} of each case and no condition was "
                f"set. nnU-Net's own predictor (nnUNetv2_predict) cannot supply it: predict with `nnunet-ext predict`"
                + (" --cohort NAME" if self.kind == "cohort" else "") + " (see docs/conditioning.md)")
        v = self.value
        if v.shape[0] not in (1, x.shape[0]):
            raise RuntimeError(f"condition for {v.shape[0]} samples, batch of {x.shape[0]}")
        return self._device_copy("value", v, x.device)

    # --- cohort table (stored in the state dict) ---------------------------------------------------------
    def cohort_table(self) -> list[str | None]:
        """Slot -> cohort name (None for a free slot)."""
        return _decode_names(self.cohort_names)

    def set_cohort_table(self, names: list[str | None]) -> None:
        if len(names) > self.n_cohorts:
            raise ValueError(f"{len(names)} cohorts but the network has {self.n_cohorts} cohort slots: use a SCIN "
                             f"trainer with more slots (e.g. SCINTrainer_32cohorts)")
        table = torch.zeros_like(self.cohort_names)
        for i, n in enumerate(names):
            if n is None:
                continue
            raw = n.encode("utf-8")
            if not raw or len(raw) > NAME_BYTES or b"\0" in raw:
                raise ValueError(f"cohort names must be 1-{NAME_BYTES} bytes without NUL, got {n!r}")
            table[i, :len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        self.cohort_names.copy_(table)

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", n_cohorts={self.n_cohorts}" if self.kind == "cohort" else "")


class _ConditionalNorm(nn.Module):
    """Instance normalisation without affine parameters; subclasses supply per-sample (gamma, beta) (B, C)."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self._state: ConditionState | None = None  # plain attribute, not a sub-module

    def attach(self, state: ConditionState) -> None:
        object.__setattr__(self, "_state", state)

    def affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Per-sample (gamma, beta), each (B or 1, C), for input ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._state is None:
            raise RuntimeError("conditional norm used outside a conditioned network (no ConditionState attached)")
        gamma, beta = self.affine(x)
        b, c = x.shape[:2]
        if gamma.shape[0] != b:  # one condition for the whole batch
            gamma, beta = gamma.expand(b, c), beta.expand(b, c)
        # instance norm = batch norm over (1, B*C, ...) (what F.instance_norm does internally); passing the
        # per-sample affine parameters here keeps normalisation and affine in one fused kernel
        out = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), None, None, gamma.reshape(-1).to(x.dtype),
                           beta.reshape(-1).to(x.dtype), True, 0.0, self.eps)
        return out.view_as(x)


class FiLMInstanceNorm(_ConditionalNorm):
    """``(gamma + gamma_r) * xhat + (beta + beta_r)``, ``(gamma_r, beta_r)`` = MLP(log2 spacing), shapes
    x ``(B, C, *spatial)``, condition ``(B or 1, 3)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, hidden: int = 16, weight=None, bias=None):
        super().__init__(num_features, eps)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.weight = nn.Parameter(torch.ones(num_features) if weight is None else weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(num_features) if bias is None else bias.detach().clone())
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * num_features))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def affine(self, x):
        d = self.mlp(self._state.features(x))
        return self.weight + d[:, :self.num_features], self.bias + d[:, self.num_features:]


class CohortInstanceNorm(_ConditionalNorm):
    """One ``(gamma, beta)`` pair per cohort slot, each its own parameter; x ``(B, C, *spatial)``,
    condition ``(B or 1,)`` long slots."""

    def __init__(self, num_features: int, n_cohorts: int, eps: float = 1e-5, weight=None, bias=None):
        super().__init__(num_features, eps)
        if n_cohorts < 1:
            raise ValueError(f"n_cohorts must be >= 1, got {n_cohorts}")
        w0 = torch.ones(num_features) if weight is None else weight.detach()
        b0 = torch.zeros(num_features) if bias is None else bias.detach()
        self.weight = nn.ParameterList([nn.Parameter(w0.clone()) for _ in range(n_cohorts)])
        self.bias = nn.ParameterList([nn.Parameter(b0.clone()) for _ in range(n_cohorts)])

    def affine(self, x):
        value = self._state.get(x)  # checks that a condition is set and fits the batch
        if self._state.ddp_safe:
            return torch.stack(list(self.weight))[value], torch.stack(list(self.bias))[value]
        used = self._state.used_slots
        if len(used) == 1:  # one cohort in the batch (always so at inference)
            return self.weight[used[0]][None], self.bias[used[0]][None]
        index = self._state.slot_index(x)
        return (torch.stack([self.weight[s] for s in used])[index],
                torch.stack([self.bias[s] for s in used])[index])


def condition_network(network: nn.Module, kind: str, n_cohorts: int = 0, hidden: int = 16) -> nn.Module:
    """Replace every torch instance norm of ``network`` in place by its conditional version (keeping its
    affine parameters as the starting point) and attach ``network.ext_condition``. Returns ``network``.

    Raises NotImplementedError when the network has no instance norm (e.g. a batch-norm plan)."""
    state = ConditionState(kind, n_cohorts)
    replaced: dict[int, nn.Module] = {}

    def convert(norm: nn.Module) -> nn.Module:
        if id(norm) not in replaced:  # a norm referenced twice (e.g. .norm and .all_modules[i]) stays one module
            if not norm.affine or norm.track_running_stats:
                raise NotImplementedError("conditional norms replace affine instance norms without running stats")
            if kind == "spacing":
                new = FiLMInstanceNorm(norm.num_features, norm.eps, hidden, norm.weight, norm.bias)
            else:
                new = CohortInstanceNorm(norm.num_features, n_cohorts, norm.eps, norm.weight, norm.bias)
            new.attach(state)
            replaced[id(norm)] = new
        return replaced[id(norm)]

    for module in list(network.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, INSTANCE_NORMS):
                module._modules[name] = convert(child)
    if not replaced:
        raise NotImplementedError(f"{type(network).__name__} has no InstanceNorm layer to condition "
                                  f"(conditional norms need nnU-Net's default instance-norm plans)")
    network.ext_condition = state
    return network


def condition_state(network: nn.Module) -> ConditionState | None:
    """The ConditionState of a (possibly DDP- or compile-wrapped) network, None if it is not conditioned."""
    for attr in ("module", "_orig_mod"):
        while hasattr(network, attr) and isinstance(getattr(network, attr), nn.Module) and \
                not hasattr(network, "ext_condition"):
            network = getattr(network, attr)
    return getattr(network, "ext_condition", None)


def kind_of_state_dict(state_dict: dict) -> str | None:
    """'spacing', 'cohort' or None (unconditioned) for a saved network state dict."""
    code = state_dict.get("ext_condition.kind_code")
    return None if code is None else KINDS[int(code.reshape(-1)[0]) - 1]


def cohort_table_of_state_dict(state_dict: dict) -> list[str | None]:
    names = state_dict.get("ext_condition.cohort_names")
    return [] if names is None else _decode_names(names)


def _decode_names(names: torch.Tensor) -> list[str | None]:
    """Rows of NUL-padded UTF-8 bytes -> names (None for an empty row)."""
    return [bytes(b for b in row if b).decode("utf-8") or None for row in names.cpu().tolist()]


def spacing_condition(spacings) -> torch.Tensor:
    """Float tensor (B, 3) from B spacings (mm)."""
    t = torch.as_tensor([list(map(float, s)) for s in spacings], dtype=torch.float32)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"need three spacings per case, got {t.tolist()}")
    return t


def count_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
