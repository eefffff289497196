"""Head edits as plain data, their validation, and functional (reversible) application.

The edit format (``device_ranker.head_edit.v1``) is what the cloud adaptor produces and
the device receives. Per head layer (keys = :meth:`EditableHead.layer_names`, e.g.
``fc0``, ``fc1``; a missing layer is not edited)::

    dW = U diag(s) V^T  (+ dense)       U [out, r], s [r], V [in, r], dense [out, in]
    db = bias                           bias [out]

All parts are optional (a layer may carry only a low-rank part, only a dense part, only
a bias, or any mix). Effective weights are ``W + dW`` and ``b + db``; the base head is
never written to. Serialised with :meth:`HeadEdit.to_dict` as a nested dict of plain
tensors, strings and numbers (``torch.save(..., weights_only=True)``-loadable, no
pickled classes, no bytes), or flat with :meth:`HeadEdit.to_flat` (``{"fc0.u": ...}``,
the shape safetensors and a proto map want).

Validation (:func:`validate_edit`) rejects unknown layers, wrong shapes/ranks, dtypes
other than float32/float16/bfloat16, NaN/Inf, and deltas outside :class:`EditBounds`
(Frobenius norm of dW and max |element| of db per layer; optionally max |element| of
dW), each with a :class:`recsys.errors.ValidationError` naming the layer and part.

Application (:func:`prepare_edit`) runs under ``torch.no_grad()``: it validates and
materialises the effective weights into new tensors (one ``mm`` + add per layer), which
the ranker then uses in its forward. Reverting drops them; the base path is then the very
same computation as before the edit, so scores are bit-identical.

Example::

    head = EditableHead((64, 128, 64))
    edit = HeadEdit({"fc0": LayerEdit(u=torch.randn(128, 4) * 0.01, s=torch.ones(4),
                                      v=torch.randn(64, 4) * 0.01)})
    prepared = prepare_edit(head, edit, EditBounds())
    q = head(torch.randn(2, 64), prepared.weights)     # [2, 64], base untouched
    HeadEdit.from_dict(edit.to_dict()) == edit          # round-trips as plain tensors
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from device_ranker.head import EditableHead
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

EDIT_FORMAT = "device_ranker.head_edit.v1"
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PARTS = ("u", "s", "v", "dense", "bias")


@dataclass(frozen=True, eq=False)
class LayerEdit:
    """The edit of one head layer; every part optional.

    Attributes:
        u: [out, r] left factor.
        s: [r] scales.
        v: [in, r] right factor (``dW = u @ diag(s) @ v.T``).
        dense: [out, in] dense weight delta, added to the low-rank part.
        bias: [out] bias delta.
    """

    u: torch.Tensor | None = None
    s: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """r, the rank of the low-rank part (0 if none)."""
        return 0 if self.s is None else int(self.s.shape[0])

    def parts(self) -> dict[str, torch.Tensor]:
        """The present parts by name."""
        return {n: getattr(self, n) for n in _PARTS if getattr(self, n) is not None}

    def delta_weight(self) -> torch.Tensor | None:
        """dW [out, in] in float32 (None if the layer has no weight part)."""
        dw = None
        if self.u is not None:
            dw = torch.mm(self.u.float() * self.s.float(), self.v.float().t())
        if self.dense is not None:
            dw = self.dense.float() if dw is None else dw + self.dense.float()
        return dw

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerEdit):
            return NotImplemented
        a, b = self.parts(), other.parts()
        return a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
        )


@dataclass(frozen=True, eq=False)
class HeadEdit:
    """An edit of the whole head: layer name -> :class:`LayerEdit`, plus metadata.

    Attributes:
        layers: e.g. ``{"fc0": LayerEdit(...), "fc1": LayerEdit(...)}``.
        meta: plain metadata (edit id, prototype id and version, source model, ...).
    """

    layers: Mapping[str, LayerEdit]
    meta: Mapping[str, str | int | float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of tensors / str / numbers (no custom classes)."""
        return {
            "format": EDIT_FORMAT,
            "meta": dict(self.meta),
            "layers": {name: dict(le.parts()) for name, le in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadEdit:
        """Inverse of :meth:`to_dict`; raises :class:`ValidationError` on a foreign dict."""
        if data.get("format") != EDIT_FORMAT:
            raise ValidationError(
                f"not a head edit: format {data.get('format')!r}, expected {EDIT_FORMAT!r}"
            )
        layers: dict[str, LayerEdit] = {}
        for name, parts in dict(data.get("layers", {})).items():
            unknown = set(parts) - set(_PARTS)
            if unknown:
                raise ValidationError(
                    f"layer {name!r}: unknown edit part(s) {sorted(unknown)}; allowed {_PARTS}"
                )
            for part, t in parts.items():
                if not isinstance(t, torch.Tensor):
                    raise ValidationError(
                        f"layer {name!r}, part {part!r}: expected a tensor, got {type(t).__name__}"
                    )
            layers[name] = LayerEdit(**parts)
        return cls(layers=layers, meta=dict(data.get("meta", {})))

    def to_flat(self) -> dict[str, torch.Tensor]:
        """Flat ``{"fc0.u": tensor, "fc0.bias": tensor, ...}`` (e.g. for safetensors)."""
        return {
            f"{name}.{part}": t
            for name, le in self.layers.items()
            for part, t in le.parts().items()
        }

    @classmethod
    def from_flat(
        cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
    ) -> HeadEdit:
        """Inverse of :meth:`to_flat`."""
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            if not name or part not in _PARTS:
                raise ValidationError(
                    f"bad flat edit key {key!r}; expected '<layer>.<part>' with part in {_PARTS}"
                )
            layers.setdefault(name, {})[part] = t
        return cls.from_dict({"format": EDIT_FORMAT, "meta": dict(meta or {}), "layers": layers})

    def nbytes(self) -> int:
        """Payload size in bytes (the tensors only): the downlink cost of this edit."""
        return sum(
            t.numel() * t.element_size() for le in self.layers.values() for t in le.parts().values()
        )

    def to(self, dtype: torch.dtype) -> HeadEdit:
        """A copy with every tensor cast to ``dtype`` (e.g. float16 for the downlink)."""
        return HeadEdit(
            {
                n: LayerEdit(**{k: t.to(dtype) for k, t in le.parts().items()})
                for n, le in self.layers.items()
            },
            dict(self.meta),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadEdit):
            return NotImplemented
        return (
            dict(self.meta) == dict(other.meta)
            and self.layers.keys() == other.layers.keys()
            and all(self.layers[k] == other.layers[k] for k in self.layers)
        )

    @staticmethod
    def compose(*edits: HeadEdit) -> HeadEdit:
        """The sum of edits as one edit (e.g. prototype edit + the device's residual).

        Low-rank parts are concatenated along r (exact: U1 S1 V1^T + U2 S2 V2^T), dense
        and bias parts are summed.
        """
        names = list(dict.fromkeys(n for e in edits for n in e.layers))
        out: dict[str, LayerEdit] = {}
        for n in names:
            les = [e.layers[n] for e in edits if n in e.layers]
            lr = [le for le in les if le.u is not None]
            dense = [le.dense for le in les if le.dense is not None]
            bias = [le.bias for le in les if le.bias is not None]
            out[n] = LayerEdit(
                u=torch.cat([le.u for le in lr], dim=1) if lr else None,
                s=torch.cat([le.s for le in lr]) if lr else None,
                v=torch.cat([le.v for le in lr], dim=1) if lr else None,
                dense=torch.stack(dense).sum(0) if dense else None,
                bias=torch.stack(bias).sum(0) if bias else None,
            )
        return HeadEdit(out, {"composed_of": len(edits)})


@dataclass(frozen=True)
class EditBounds:
    """Limits an edit must respect (the adaptor clips to the same numbers).

    Attributes:
        max_weight_norm: bound on the Frobenius norm of each layer's dW (None: no bound,
            finiteness is still checked). 8.0 is about the norm of a trained ml-100k
            head layer, i.e. an edit may at most roughly double a layer.
        max_weight_abs: optional bound on every element of dW (None: off; the norm bound
            already implies |dW_ij| <= max_weight_norm). Costs one reduction per layer.
        max_bias_abs: bound on every element of db. Trained biases are O(0.1).
        max_rank: bound on r of the low-rank part.
    """

    max_weight_norm: float | None = 8.0
    max_weight_abs: float | None = None
    max_bias_abs: float = 0.5
    max_rank: int = 64


_DEFAULT_BOUNDS = EditBounds()


@dataclass(frozen=True, eq=False)
class PreparedEdit:
    """A validated edit with its effective head weights (new tensors; base untouched).

    Attributes:
        weights: per layer (W + dW [out, in], b + db [out]), float32, no autograd history.
        edit: the plain edit it came from.
    """

    weights: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    edit: HeadEdit


def _check_structure(head: EditableHead, edit: HeadEdit, bounds: EditBounds) -> None:
    if not isinstance(edit, HeadEdit):
        raise ValidationError(f"expected a HeadEdit, got {type(edit).__name__}")
    spec = head._spec  # cached {name: (out, in)}
    for name, le in edit.layers.items():
        if name not in spec:
            raise ValidationError(
                f"edit names unknown head layer {name!r}; the head has {list(spec)}"
            )
        if not isinstance(le, LayerEdit):
            raise ValidationError(f"layer {name!r}: expected a LayerEdit, got {type(le).__name__}")
        out_f, in_f = spec[name]
        u, s, v = le.u, le.s, le.v
        lowrank = (u is not None) + (s is not None) + (v is not None)
        if lowrank not in (0, 3):
            raise ValidationError(
                f"layer {name!r}: a low-rank edit needs u, s and v together, got only "
                f"{[p for p in ('u', 's', 'v') if getattr(le, p) is not None]}"
            )
        for part in _PARTS:
            t = getattr(le, part)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValidationError(
                    f"layer {name!r}, part {part!r}: expected a tensor, got {type(t).__name__}"
                )
            if t.dtype not in ALLOWED_DTYPES:
                raise ValidationError(
                    f"layer {name!r}, part {part!r}: dtype {t.dtype} not allowed; use one of "
                    f"{[str(d) for d in ALLOWED_DTYPES]}"
                )
        r = 0
        if lowrank:
            r = s.shape[0] if s.dim() == 1 else -1
            if not 1 <= r <= min(bounds.max_rank, out_f, in_f):
                raise ValidationError(
                    f"layer {name!r}: s must be 1-D of length r in 1..{min(bounds.max_rank, out_f, in_f)}, "
                    f"got shape {tuple(s.shape)}"
                )
        expected = {
            "u": (out_f, r),
            "s": (r,),
            "v": (in_f, r),
            "dense": (out_f, in_f),
            "bias": (out_f,),
        }
        for part in _PARTS:
            t = getattr(le, part)
            if t is not None and t.shape != expected[part]:
                raise ValidationError(
                    f"layer {name!r}, part {part!r}: shape {tuple(t.shape)}, expected {expected[part]} "
                    f"(layer weight is [out={out_f}, in={in_f}])"
                )


def _diagnose(
    name: str, le: LayerEdit, dw: torch.Tensor | None, db: torch.Tensor | None, bounds: EditBounds
) -> None:
    """Slow path after a failed check: raise naming the layer, the part and the value."""
    for part, t in le.parts().items():
        if not torch.isfinite(t).all():
            raise ValidationError(f"layer {name!r}, part {part!r}: contains NaN or Inf")
    if dw is not None:
        if not torch.isfinite(dw).all():
            raise ValidationError(f"layer {name!r}: weight delta dW overflows to NaN/Inf")
        nrm = float(torch.linalg.vector_norm(dw))
        if bounds.max_weight_norm is not None and nrm > bounds.max_weight_norm:
            raise ValidationError(
                f"layer {name!r}: ||dW||_F = {nrm:.4g} > bound {bounds.max_weight_norm}; clip the "
                "edit or raise EditBounds.max_weight_norm"
            )
        m = float(dw.abs().max())
        raise ValidationError(
            f"layer {name!r}: weight delta dW has max |element| {m:.4g} > bound "
            f"{bounds.max_weight_abs}; clip the edit or raise EditBounds.max_weight_abs"
        )
    m = float(db.abs().max()) if db is not None else float("nan")
    raise ValidationError(
        f"layer {name!r}: bias delta has max |element| {m:.4g} > bound {bounds.max_bias_abs}; "
        "clip the edit or raise EditBounds.max_bias_abs"
    )


@torch.no_grad()
def prepare_edit(
    head: EditableHead, edit: HeadEdit, bounds: EditBounds | None = None
) -> PreparedEdit:
    """Validate ``edit`` and materialise the effective head weights, without autograd.

    Per edited layer: one element-wise scale and one ``mm`` (U diag(s) V^T), one norm
    of dW and one max-|.| of db (NaN/Inf anywhere, including in a factor, propagates
    into them and fails the comparison), one add for W and one for b. No Python loop
    over elements, no concatenation. Raises :class:`ValidationError` (shape, dtype,
    NaN/Inf, bound) naming the layer and part.

    Returns:
        :class:`PreparedEdit` whose ``weights`` feed ``head(x, weights)``.
    """
    bounds = bounds or _DEFAULT_BOUNDS
    _check_structure(head, edit, bounds)
    norm_limit = math.inf if bounds.max_weight_norm is None else bounds.max_weight_norm
    weights: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, w, b in head._named_params:
        le = edit.layers.get(name)
        if le is None:
            weights.append((w, b))
            continue
        dt = w.dtype
        dw = None
        if le.u is not None:
            u, s, v = le.u, le.s, le.v
            if u.dtype is not dt or s.dtype is not dt or v.dtype is not dt:  # fp16/bf16 downlink
                u, s, v = u.to(dt), s.to(dt), v.to(dt)
            dw = torch.mm(u * s, v.t())  # [out, in] = U diag(s) V^T
        if le.dense is not None:
            dense = le.dense if le.dense.dtype is dt else le.dense.to(dt)
            dw = dense if dw is None else dw + dense
        if dw is not None:
            # `not x <= limit` is also True for NaN
            if not float(torch.linalg.vector_norm(dw)) <= norm_limit:
                _diagnose(name, le, dw, None, bounds)
            if bounds.max_weight_abs is not None and not (
                float(torch.linalg.vector_norm(dw, float("inf"))) <= bounds.max_weight_abs
            ):
                _diagnose(name, le, dw, None, bounds)
            w = w + dw
        if le.bias is not None:
            db = le.bias if le.bias.dtype is dt else le.bias.to(dt)
            if not float(torch.linalg.vector_norm(db, float("inf"))) <= bounds.max_bias_abs:
                _diagnose(name, le, None, db, bounds)
            b = b + db
        weights.append((w, b))
    return PreparedEdit(weights=tuple(weights), edit=edit)


def validate_edit(head: EditableHead, edit: HeadEdit, bounds: EditBounds | None = None) -> None:
    """Raise :class:`ValidationError` if ``edit`` cannot be applied to ``head``."""
    prepare_edit(head, edit, bounds)


def random_edit(
    head: EditableHead,
    rank: int = 8,
    scale: float = 0.01,
    *,
    generator: torch.Generator | None = None,
    bias: bool = True,
) -> HeadEdit:
    """A random low-rank edit of every layer (for tests and benchmarks).

    ``scale`` is the standard deviation of the factor entries; ``s`` is all ones.
    """
    layers = {}
    for name, (out_f, in_f) in head.edit_spec().items():
        layers[name] = LayerEdit(
            u=torch.randn(out_f, rank, generator=generator) * math.sqrt(scale),
            s=torch.ones(rank),
            v=torch.randn(in_f, rank, generator=generator) * math.sqrt(scale),
            bias=torch.randn(out_f, generator=generator) * scale if bias else None,
        )
    return HeadEdit(layers, {"source": "random_edit"})
