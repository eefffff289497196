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

Application (:func:`prepare_edit`) runs under ``torch.no_grad()``: it validates the edit
and keeps low-rank parts **factored** (``A = U diag(s)``, ``V``; the norm bound is
checked exactly from the [r, r] Gram matrices), so the head applies them in its forward
as ``x W^T + (x V) A^T`` (:class:`~device_ranker.head.EditedWeights`); dense parts and
large ranks are added to W. Reverting drops the prepared weights; the base path is then
the very same computation as before the edit, so scores are bit-identical.

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
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from device_ranker.head import EditableHead, EditedLinear, EditedWeights
from recsys.edit_payload import DecodedPayload
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
        """Inverse of :meth:`to_flat` (one pass over the keys: it is on the device's edit
        path)."""
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            if not name or part not in _PARTS:
                raise ValidationError(
                    f"bad flat edit key {key!r}; expected '<layer>.<part>' with part in {_PARTS}"
                )
            if not isinstance(t, torch.Tensor):
                raise ValidationError(
                    f"layer {name!r}, part {part!r}: expected a tensor, got {type(t).__name__}"
                )
            layers.setdefault(name, {})[part] = t
        return cls({n: LayerEdit(**p) for n, p in layers.items()}, dict(meta or {}))

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


class PreparedEdit:
    """A validated edit with its effective head weights (new tensors; base untouched).

    Attributes:
        weights: :class:`~device_ranker.head.EditedWeights`: per layer the base W (or
            W + the dense part), b + db, and the low-rank factors ``A = U diag(s)``
            [out, r], ``V`` [in, r] kept factored; read as a sequence it is the dense
            (W + dW [out, in], b + db [out]) per layer, float32, no autograd history.
        edit: the plain :class:`HeadEdit` it came from (built on first access when the
            edit was prepared straight from a payload, :func:`prepare_decoded`).
    """

    __slots__ = ("_edit", "_make_edit", "weights")

    def __init__(
        self,
        weights: EditedWeights,
        edit: HeadEdit | None = None,
        *,
        make_edit: Callable[[], HeadEdit] | None = None,
    ) -> None:
        if (edit is None) == (make_edit is None):
            raise ValueError("PreparedEdit needs exactly one of edit and make_edit")
        self.weights = weights
        self._edit = edit
        self._make_edit = make_edit

    @property
    def edit(self) -> HeadEdit:
        if self._edit is None:
            self._edit = self._make_edit()
        return self._edit


def _check_structure(head: EditableHead, edit: HeadEdit, bounds: EditBounds) -> None:
    """Layer names, part types, dtypes, rank and shapes of ``edit`` against ``head``."""
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
        present = [
            (p, t)
            for p, t in (("u", u), ("s", s), ("v", v), ("dense", le.dense), ("bias", le.bias))
            if t is not None
        ]
        for part, t in present:
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
        expected = {"u": (out_f, r), "s": (r,), "v": (in_f, r), "dense": (out_f, in_f)}
        for part, t in present:
            want = expected.get(part, (out_f,))
            if t.shape != want:
                raise ValidationError(
                    f"layer {name!r}, part {part!r}: shape {tuple(t.shape)}, expected {want} "
                    f"(layer weight is [out={out_f}, in={in_f}])"
                )


def _np(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy view of ``t`` (a copy only for other dtypes): the small reductions
    of validation cost ~2x less per call in numpy than in torch."""
    if t.dtype is torch.float32 and not t.requires_grad:
        return t.numpy()
    return t.detach().float().numpy()


def _diagnose(
    name: str, le: LayerEdit, dw: torch.Tensor | None, db: torch.Tensor | None, bounds: EditBounds
) -> None:
    """Slow path after a failed check: raise naming the layer, the part and the value
    (returns only when ``dw`` is in fact within the bounds)."""
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
        if bounds.max_weight_abs is not None and not m <= bounds.max_weight_abs:
            raise ValidationError(
                f"layer {name!r}: weight delta dW has max |element| {m:.4g} > bound "
                f"{bounds.max_weight_abs}; clip the edit or raise EditBounds.max_weight_abs"
            )
        return  # a factored check's false alarm (e.g. its Gram product overflowed)
    m = float(db.abs().max()) if db is not None else float("nan")
    raise ValidationError(
        f"layer {name!r}: bias delta has max |element| {m:.4g} > bound {bounds.max_bias_abs}; "
        "clip the edit or raise EditBounds.max_bias_abs"
    )


def keeps_factored(out_f: int, in_f: int, rank: int, has_dense: bool, bounds: EditBounds) -> bool:
    """Keep a layer's low-rank part factored (else materialise dW = A V^T)?

    Factored when its checks and forward are cheaper than the dense ones: the Gram norm
    costs ``2 r^2 (out + in)`` FLOPs against ``2 r out in`` for forming dW, i.e. when
    ``r (out + in) < out in`` (r < 43 at D=64, H=128). A layer that also carries a dense
    part, or bounds with ``max_weight_abs`` (an element-wise bound needs dW itself), is
    materialised.
    """
    return not has_dense and bounds.max_weight_abs is None and rank * (out_f + in_f) < out_f * in_f


def _prepare_layer(
    name: str,
    w: torch.Tensor,
    b: torch.Tensor,
    parts: Mapping[str, np.ndarray],
    bounds: EditBounds,
) -> EditedLinear:
    """Validate one layer's edit and build its :class:`EditedLinear` (the one place both
    :func:`prepare_edit` and :func:`prepare_decoded` check the bounds).

    Args:
        name: the layer (for errors); w [out, in], b [out]: its base weights.
        parts: float32 numpy arrays, structure already checked: ``u`` [out, r], ``s``
            [r], ``v`` [in, r], ``dense`` [out, in], ``bias`` [out], any present.

    Small reductions run in numpy (a call costs about half of torch's at these sizes).
    NaN/Inf anywhere, also in a factor, propagates into a norm and fails its comparison;
    the slow path (:func:`_diagnose`) then names the layer, the part and the value.
    """
    norm_limit = math.inf if bounds.max_weight_norm is None else bounds.max_weight_norm
    a = v = dw = None
    u, dense = parts.get("u"), parts.get("dense")
    if u is not None:
        a, v = u * parts["s"], parts["v"]  # A = U diag(s) [out, r], V [in, r]
        if keeps_factored(w.shape[0], w.shape[1], a.shape[1], dense is not None, bounds):
            sq = float(np.vdot(np.dot(a.T, a), np.dot(v.T, v)))  # ||A V^T||_F^2, [r, r] Grams
            if not sq <= norm_limit * norm_limit:  # `not x <= limit` is also True for NaN
                with np.errstate(all="ignore"):
                    dw_full = a @ v.T
                _diagnose(name, _layer_edit(parts), torch.from_numpy(dw_full), None, bounds)
        else:
            dw, a, v = a @ v.T, None, None  # [out, in]
    if dense is not None:
        dw = dense if dw is None else dw + dense
    if dw is not None:
        if not float(np.sqrt(np.vdot(dw, dw))) <= norm_limit:
            _diagnose(name, _layer_edit(parts), torch.from_numpy(dw), None, bounds)
        if bounds.max_weight_abs is not None and not (
            float(np.abs(dw).max()) <= bounds.max_weight_abs
        ):
            _diagnose(name, _layer_edit(parts), torch.from_numpy(dw), None, bounds)
        w = torch.add(w.detach(), _tensor(dw, w.dtype))
    db = parts.get("bias")
    if db is not None:
        if not float(np.abs(db).max()) <= bounds.max_bias_abs:
            _diagnose(name, _layer_edit(parts), None, torch.from_numpy(db), bounds)
        b = torch.add(b.detach(), _tensor(db, b.dtype))
    if a is None:
        return EditedLinear(w, b)
    return EditedLinear(w, b, _tensor(a, w.dtype), _tensor(v, w.dtype))


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype is dtype else t.to(dtype)


def _layer_edit(parts: Mapping[str, np.ndarray]) -> LayerEdit:
    return LayerEdit(**{k: torch.from_numpy(np.asarray(p)) for k, p in parts.items()})


@torch.no_grad()
def prepare_edit(
    head: EditableHead, edit: HeadEdit, bounds: EditBounds | None = None
) -> PreparedEdit:
    """Validate ``edit`` and build its (factored) effective head weights, no autograd.

    Per edited layer with a low-rank part (r small, see :func:`keeps_factored`): ``A = U * s``
    [out, r] and the exact Frobenius norm of dW from the factors,
    ``||A V^T||_F^2 = sum((A^T A) * (V^T V))`` (two [r, r] Gram products:
    ``2 r^2 (out + in)`` FLOPs instead of ``2 r out in`` for materialising); the
    factors are kept and applied in the head's forward
    (:class:`~device_ranker.head.EditedLinear`). Dense parts (and large ranks) are
    added to W, with ``||dW||_F`` of the dense delta. Bias: one max-|.| of db and one
    add. No Python loop over elements. Raises :class:`ValidationError` (shape, dtype,
    NaN/Inf, bound) naming the layer and part.

    Returns:
        :class:`PreparedEdit` whose ``weights`` feed ``head(x, weights)``.
    """
    bounds = bounds or _DEFAULT_BOUNDS
    _check_structure(head, edit, bounds)
    layers = []
    for name, w, b in head._named_params:
        le = edit.layers.get(name)
        if le is None:
            layers.append(EditedLinear(w, b))
        else:
            parts = {k: _np(t) for k, t in le.parts().items()}
            layers.append(_prepare_layer(name, w, b, parts, bounds))
    return PreparedEdit(EditedWeights(layers), edit)


def prepare_decoded(
    head: EditableHead,
    decoded: DecodedPayload,
    bounds: EditBounds | None = None,
    prototype: HeadEdit | None = None,
) -> PreparedEdit:
    """:func:`prepare_edit` straight from a decoded payload (the device's edit path).

    ``decoded`` must come from :func:`recsys.edit_payload.decode_values` with this
    head's spec (names, shapes and ranks are then checked, once per payload layout, and
    the values are finite). The layers are validated from numpy views of its one value
    array, without building per-part tensors; the :class:`HeadEdit` (``prepared.edit``)
    is made only if someone reads it. With ``prototype`` the edit is
    ``HeadEdit.compose(prototype, edit)`` (factors concatenated along r, bias deltas
    summed), checked as a whole.

    Args:
        head: the ranker's head; decoded: the residual or absolute edit.
        bounds: the device's :class:`EditBounds` (its ``max_rank`` bounds the composed r).
        prototype: the prototype edit the payload is a residual of, or None.

    Returns:
        :class:`PreparedEdit`.
    """
    bounds = bounds or _DEFAULT_BOUNDS
    own = decoded.layers()  # {layer: {part: numpy view}}
    for name in own:
        if name not in head._spec:
            raise ValidationError(
                f"edit names unknown head layer {name!r}; the head has {list(head._spec)}"
            )
    if prototype is not None:
        own = _compose_arrays(head, _prototype_parts(head, prototype, bounds), own, bounds)
    layers = []
    for name, w, b in head._named_params:
        parts = own.get(name)
        layers.append(
            EditedLinear(w, b) if parts is None else _prepare_layer(name, w, b, parts, bounds)
        )

    def make_edit() -> HeadEdit:
        edit = HeadEdit.from_flat(decoded.tensors())
        return edit if prototype is None else HeadEdit.compose(prototype, edit)

    return PreparedEdit(EditedWeights(layers), make_edit=make_edit)


# id(prototype) -> (weak reference to it, (id(head), bounds), its numpy parts)
_PROTOTYPES: dict[int, tuple[weakref.ref, tuple, dict]] = {}


def _prototype_parts(
    head: EditableHead, prototype: HeadEdit, bounds: EditBounds
) -> dict[str, dict[str, np.ndarray]]:
    """A held prototype's structure check and float32 numpy parts, done once per
    prototype object (the device keeps it across the many residuals sent against it)."""
    key = (id(head), bounds)
    cached = _PROTOTYPES.get(id(prototype))
    if cached is not None and cached[0]() is prototype and cached[1] == key:
        return cached[2]
    _check_structure(head, prototype, bounds)
    parts = {n: {k: _np(t) for k, t in le.parts().items()} for n, le in prototype.layers.items()}
    pid = id(prototype)
    ref = weakref.ref(prototype, lambda _ref: _PROTOTYPES.pop(pid, None))
    _PROTOTYPES[pid] = (ref, key, parts)
    return parts


def _compose_arrays(
    head: EditableHead,
    prototype: Mapping[str, Mapping[str, np.ndarray]],
    own: dict[str, dict[str, np.ndarray]],
    bounds: EditBounds,
) -> dict[str, dict[str, np.ndarray]]:
    """:meth:`HeadEdit.compose` (prototype, own) on numpy parts, with the rank bound."""
    out = {}
    for name in dict.fromkeys([*prototype, *own]):
        p = prototype.get(name, {})
        q = own.get(name, {})
        parts = {}
        for k in ("dense", "bias"):
            if k in p or k in q:
                parts[k] = p[k] + q[k] if k in p and k in q else p.get(k, q.get(k))
        lr = [x for x in (p, q) if "u" in x]
        if lr:
            parts["u"] = np.concatenate([x["u"] for x in lr], axis=1)
            parts["s"] = np.concatenate([x["s"] for x in lr])
            parts["v"] = np.concatenate([x["v"] for x in lr], axis=1)
            limit = min(bounds.max_rank, *head._spec[name])
            if parts["s"].shape[0] > limit:
                raise ValidationError(
                    f"layer {name!r}: s must be 1-D of length r in 1..{limit}, "
                    f"got shape {tuple(parts['s'].shape)}"
                )
        out[name] = parts
    return out


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
