"""Validating a head edit and building its effective head weights, kept factored.

The device's half of :mod:`device_ranker.edits` (the plain-data edit format): an edit
is checked against the head and its :class:`EditBounds`, then turned into the weights
the head's forward uses (:class:`~device_ranker.head.EditedWeights`), never touching the
base parameters.

* :func:`prepare_edit` takes a :class:`HeadEdit` (any source: the cloud's, a composed
  one, a fine-tuned dense one);
* :func:`prepare_decoded` takes a payload decoded by
  :func:`recsys.edit_payload.decode_values` (the device service's and the replay's fast
  path: every layer in one set of numpy calls, no per-part tensors, the
  :class:`HeadEdit` built only if read), optionally composed with a held prototype edit.

Both validate each layer in :func:`_prepare_layer`: low-rank parts stay factored
(``A = U diag(s)`` [out, r], ``V`` [in, r]) when that is cheaper
(:func:`keeps_factored`), with the exact Frobenius norm of dW from two [r, r] Gram
matrices; dense parts and large ranks are added to W. NaN/Inf propagate into the norms;
a failed check names the layer, the part and the value (:func:`_diagnose`).

Example::

    prepared = prepare_edit(head, edit, EditBounds())
    q = head(x, prepared.weights)                       # [B, D], factored
    decoded = decode_values(payload, spec=head.edit_spec(), max_rank=64)
    prepared = prepare_decoded(head, decoded, EditBounds(), prototype=None)
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from device_ranker.edits import _DEFAULT_BOUNDS, ALLOWED_DTYPES, EditBounds, HeadEdit, LayerEdit
from device_ranker.head import EditableHead, EditedLinear, EditedWeights
from recsys.edit_payload import DecodedPayload, check_shapes
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


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

    ``decoded`` comes from :func:`recsys.edit_payload.decode_values`, whose NaN/Inf
    check has not run yet: when the plan for this layout is already built (every edit
    after a layout's first) and the joint bounds below are finite, cover every value and
    are cleared, they prove every value finite (a NaN/Inf makes a sum of squares NaN/Inf)
    and the check is skipped; any other path (a layout's first edit, whose plan reads the
    arrays; a payload whose prototype fields were read, as a pushed edit's are) runs it
    first (the decoder's error, naming the tensor). Names, shapes and the rank bound are
    checked against the head once per payload layout, head and bounds (:func:`_plan`). Per
    request, the layers with a factored low-rank part and/or a bias delta are validated and
    built together from the payload's one value array (:func:`_joint_layers`: every
    ``A = U diag(s)`` in one product, all norm and bias bounds in three dot products,
    ``b + db``); an edit those summed bounds cannot clear, and other layouts, go per layer
    (:func:`_fast_layer`, then the exact checks of :func:`_prepare_layer`, which name the
    part and value). No per-part tensors; the :class:`HeadEdit` (``prepared.edit``) is made
    only if someone reads it. With ``prototype`` the edit is
    ``HeadEdit.compose(prototype, edit)`` (factors concatenated along r, bias deltas
    summed), checked as a whole, per layer.

    Args:
        head: the ranker's head; decoded: the residual or absolute edit.
        bounds: the device's :class:`EditBounds` (its ``max_rank`` bounds the composed r).
        prototype: the prototype edit the payload is a residual of, or None.

    Returns:
        :class:`PreparedEdit`.
    """
    bounds = bounds or _DEFAULT_BOUNDS
    plan = _plan(head, decoded, bounds)
    vals = decoded.unchecked_values  # [N] float32, NaN/Inf not refused yet
    if prototype is None:
        layers = _layers_without_prototype(plan, decoded, vals, bounds)
    else:
        layers = _layers_with_prototype(head, plan, decoded, vals, prototype, bounds)

    def make_edit() -> HeadEdit:
        edit = HeadEdit.from_flat(decoded.tensors())
        return edit if prototype is None else HeadEdit.compose(prototype, edit)

    return PreparedEdit(EditedWeights(layers), make_edit=make_edit)


def _layers_without_prototype(
    plan: _Plan, decoded: DecodedPayload, vals: np.ndarray, bounds: EditBounds
) -> list[EditedLinear]:
    """The head layers of an absolute edit (no prototype) from the payload's values
    ``vals`` [N] (``decoded.unchecked_values``): the joint path when its bounds clear
    (skipping the NaN/Inf check when they prove every value finite), else the NaN/Inf
    check, then the joint layers when they are every layer, else per layer
    (:func:`_per_layer`)."""
    joint = plan.joint
    fast = None if joint is None else _joint_layers(joint, vals)
    if fast is not None and joint.proves_finite:  # every layer: the common case
        decoded.mark_finite()  # its cleared bounds were finite: so is every value
        return fast
    decoded.check_finite()  # the decoder's error for NaN/Inf, naming the tensor
    if fast is not None and joint.whole:
        return fast
    return _per_layer(plan.steps, vals, bounds, fast)


def _per_layer(
    steps: tuple[_Untouched | _Fast | _General, ...],
    vals: np.ndarray,
    bounds: EditBounds,
    fast: list[EditedLinear] | None,
) -> list[EditedLinear]:
    """Every head layer of a plan, one by one: ``fast`` holds the :class:`_Fast` layers
    :func:`_joint_layers` already built (in plan order), or None when it did not (then
    :func:`_fast_layer` builds each); untouched layers keep the base weights; the others
    take the exact checks of :func:`_prepare_layer`."""
    built = None if fast is None else iter(fast)
    layers = []
    for step in steps:
        if type(step) is _Fast:
            layers.append(_fast_layer(step, vals, bounds) if built is None else next(built))
        elif type(step) is _Untouched:
            layers.append(EditedLinear(step.w, step.b))
        else:
            views = _views(vals, step.parts)
            layers.append(_prepare_layer(step.name, step.w, step.b, views, bounds))
    return layers


def _layers_with_prototype(
    head: EditableHead,
    plan: _Plan,
    decoded: DecodedPayload,
    vals: np.ndarray,
    prototype: HeadEdit,
    bounds: EditBounds,
) -> list[EditedLinear]:
    """The head layers of ``compose(prototype, residual)`` from the residual's values
    ``vals`` [N], after the NaN/Inf check: per layer, :func:`_fast_composed` when both
    sides are fast (no dense part), else the exact :func:`_composed_layer`."""
    decoded.check_finite()
    proto_parts, proto_fast = _prototype_parts(head, prototype, bounds)
    layers = []
    for step in plan.steps:
        held = proto_fast.get(step.name)
        if type(step) is _Fast and held is not None:
            layers.append(_fast_composed(head, step, vals, held, proto_parts, bounds))
        else:
            layers.append(_composed_layer(head, step, vals, proto_parts, bounds))
    return layers


class _Untouched(NamedTuple):
    """A head layer the payload does not edit."""

    name: str
    w: torch.Tensor
    b: torch.Tensor


class _Fast(NamedTuple):
    """A layer :func:`_fast_layer` prepares: a factored low-rank part and/or a bias delta
    on float32 CPU weights."""

    name: str
    w: torch.Tensor  # [out, in] base weight
    b: torch.Tensor  # [out] base bias
    b_np: np.ndarray  # numpy view of b (parameters are updated in place)
    u: tuple[slice, tuple[int, ...]] | None  # (where in the value array, shape) of U [out, r]
    s: tuple[slice, tuple[int, ...]] | None  # ... of s [r]
    v: tuple[slice, tuple[int, ...]] | None  # ... of V [in, r]
    bias: tuple[slice, tuple[int, ...]] | None  # ... of db [out]
    norm2: float  # squared Frobenius bound of dW (inf: none)
    bias_abs: float  # element bound of db
    b_ptr: int  # the address b_np views: a replaced storage is caught


class _General(NamedTuple):
    """Any other edited layer (dense part, element-wise weight bound, other dtypes):
    :func:`_prepare_layer` on views of the parts."""

    name: str
    w: torch.Tensor
    b: torch.Tensor
    parts: dict[str, tuple[slice, tuple[int, ...]]]


class _JointLayer(NamedTuple):
    """Where one :class:`_Fast` layer's parts lie for :func:`_joint_layers` (and its base
    weights, unpacked once per plan)."""

    w: torch.Tensor  # [out, in] base weight
    b: torch.Tensor  # [out] base bias
    b_np: np.ndarray  # numpy view of b
    b_ptr: int  # the address b_np views
    a: slice | None  # rows of A = U diag(s) [out, r] in every layer's A [sum(out), r], or None
    v: slice | None  # rows of V [in, r] in every layer's V [sum(in), r]
    db: slice | None  # db [out] in the value array (None: no bias delta)
    b_new: slice | None  # b + db [out] in the buffer


class _Joint(NamedTuple):
    """Every :class:`_Fast` layer of a plan, prepared together by :func:`_joint_layers`
    with a fixed handful of numpy calls whatever the number of layers.

    Needs the parts as the codec lays them out (:data:`recsys.edit_payload.VALUE_ORDER`):
    every U, every V, every db and every s each one slice of the value array, in the same
    layer order, and one rank r for every low-rank layer. The buffer [size] holds
    ``A = U diag(s)`` of every low-rank layer, then ``b + db`` of every biased one.
    """

    u: slice  # every U [sum(out) * r]
    s: slice  # every s [n * r]
    v: slice  # every V [sum(in) * r]
    db: slice  # every db [sum(out_b)]
    s_shape: tuple[int, int]  # (n, r): one row of s per low-rank layer
    row_layer: np.ndarray  # [sum(out)] intp: the low-rank layer of each row of every U
    n_a: int  # sum(out) * r
    a_shape: tuple[int, int]  # (sum(out), r): every layer's A, stacked
    v_shape: tuple[int, int]  # (sum(in), r): every layer's V, stacked
    size: int
    layers: tuple[_JointLayer, ...]  # in head order
    norm2: float  # the squared Frobenius bound of dW, less a rounding margin
    bias2: float  # the squared element bound of db, less the same margin
    whole: bool  # every head layer is one of ``layers``
    # whole, its parts are every value of the payload and both bounds are finite: then
    # values that clear them are all finite (a NaN/Inf in U, s, V or db makes its sum of
    # squares, and so the product or sum compared, NaN or Inf)
    proves_finite: bool


class _Plan(NamedTuple):
    """What :func:`prepare_decoded` does per head layer, and the joint part of it."""

    steps: tuple[_Untouched | _Fast | _General, ...]
    joint: _Joint | None  # None: no :class:`_Fast` layer, or not laid out as _Joint needs


# (id(layout groups), id(head)) -> (those groups, head, bounds, plan)
_PLANS: dict[tuple[int, int], tuple[tuple, EditableHead, EditBounds, _Plan]] = {}
_MAX_PLANS = 64
# the cheap bounds must clear the limits by this relative margin: float32 sums of squares
# may round a little low, and at the limit the exact check decides
_MARGIN = 1e-3


def _plan(head: EditableHead, decoded: DecodedPayload, bounds: EditBounds) -> _Plan:
    """Per head layer, what :func:`prepare_decoded` does with a payload of this layout
    (:class:`_Untouched`, :class:`_Fast` or :class:`_General`), and the :class:`_Joint`
    of its fast layers, worked out once per (layout, head, bounds).

    Checks once per plan: known layers, u/s/v together with one rank
    ``1 <= r <= min(out, in, bounds.max_rank)``, every shape (the checks
    :func:`~recsys.edit_payload.decode_values` runs given a spec, here also without one).
    """
    groups = decoded.groups
    key = (id(groups), id(head))
    hit = _PLANS.get(key)
    if (
        hit is not None
        and hit[0] is groups
        and hit[1] is head
        and (hit[2] is bounds or hit[2] == bounds)
    ):
        return hit[3]
    check_shapes(decoded.arrays(), head._spec, bounds.max_rank)
    slots = {
        layer: {p: (slice(a, b), shape) for p, a, b, shape in parts} for layer, parts in groups
    }
    norm = math.inf if bounds.max_weight_norm is None else bounds.max_weight_norm
    plan: list[_Untouched | _Fast | _General] = []
    for name, w, b in head._named_params:
        parts = slots.get(name)
        if parts is None:
            plan.append(_Untouched(name, w, b))
        elif (
            "dense" not in parts
            and w.dtype is torch.float32
            and b.dtype is torch.float32
            and w.device.type == "cpu"
            and b.device.type == "cpu"
            and ("u" not in parts or keeps_factored(*w.shape, parts["s"][1][0], False, bounds))
        ):
            u, s, v, bias = (parts.get(p) for p in ("u", "s", "v", "bias"))
            b_np = b.detach().numpy()
            plan.append(
                _Fast(
                    name, w, b, b_np, u, s, v, bias, norm * norm, bounds.max_bias_abs, b.data_ptr()
                )
            )
        else:
            plan.append(_General(name, w, b, parts))
    steps = tuple(plan)
    fast = [step for step in steps if type(step) is _Fast]
    n_values = sum(b - a for _, parts in groups for _, a, b, _ in parts)
    joint = _joint(fast, len(fast) == len(steps), n_values, bounds) if fast else None
    out = _Plan(steps, joint)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = (groups, head, bounds, out)
    return out


def _run(parts: list[tuple[slice, tuple[int, ...]]]) -> slice | None:
    """The one slice these parts fill back to back (in this order), or None."""
    if not parts:
        return slice(0, 0)
    sls = [p[0] for p in parts]
    if any(x.stop != y.start for x, y in itertools.pairwise(sls)):
        return None
    return slice(sls[0].start, sls[-1].stop)


def _joint(fast: list[_Fast], whole: bool, n_values: int, bounds: EditBounds) -> _Joint | None:
    """The :class:`_Joint` of a plan's fast layers (once per plan; ``n_values``: the
    payload's number of values), or None when their parts do not lie as it needs (then
    :func:`_fast_layer` runs per layer)."""
    lowrank = sorted((st for st in fast if st.u is not None), key=lambda st: st.u[0].start)
    biased = sorted((st for st in fast if st.bias is not None), key=lambda st: st.bias[0].start)
    runs = [_run([getattr(st, p) for st in lowrank]) for p in ("u", "s", "v")]
    runs.append(_run([st.bias for st in biased]))
    ranks = {st.s[1][0] for st in lowrank}
    if any(r is None for r in runs) or len(ranks) > 1:
        return None
    rank = ranks.pop() if ranks else 0
    out_rows = [st.u[1][0] for st in lowrank]
    in_rows = [st.v[1][0] for st in lowrank]
    a_rows, v_rows = {}, {}  # id(step) -> its rows in the stacked A / V
    for st, a0, o, v0, i in zip(
        lowrank,
        itertools.accumulate(out_rows, initial=0),
        out_rows,
        itertools.accumulate(in_rows, initial=0),
        in_rows,
        strict=False,
    ):
        a_rows[id(st)], v_rows[id(st)] = slice(a0, a0 + o), slice(v0, v0 + i)
    n_a = sum(out_rows) * rank
    at = n_a
    layers = []
    for st in fast:
        db = b_new = None
        if st.bias is not None:
            db, b_new = st.bias[0], slice(at, at + st.bias[1][0])
            at = b_new.stop
        layers.append(
            _JointLayer(
                w=st.w,
                b=st.b,
                b_np=st.b_np,
                b_ptr=st.b_ptr,
                a=a_rows.get(id(st)),
                v=v_rows.get(id(st)),
                db=db,
                b_new=b_new,
            )
        )
    norm = math.inf if bounds.max_weight_norm is None else bounds.max_weight_norm
    u, s, v, db = runs
    norm2 = norm * norm * (1 - _MARGIN)
    bias2 = bounds.max_bias_abs * bounds.max_bias_abs * (1 - _MARGIN)
    covered = sum(r.stop - r.start for r in runs)  # the runs do not overlap
    return _Joint(
        u=u,
        s=s,
        v=v,
        db=db,
        s_shape=(len(lowrank), rank),
        row_layer=np.repeat(np.arange(len(lowrank), dtype=np.intp), out_rows),
        n_a=n_a,
        a_shape=(sum(out_rows), rank),
        v_shape=(sum(in_rows), rank),
        size=at,
        layers=tuple(layers),
        norm2=norm2,
        bias2=bias2,
        whole=whole,
        proves_finite=whole
        and covered == n_values
        and (n_a == 0 or norm2 < math.inf)
        and (db.stop == db.start or bias2 < math.inf),
    )


def _joint_layers(joint: _Joint, vals: np.ndarray) -> list[EditedLinear] | None:
    """Every :class:`_Fast` layer of a plan from the payload's values ``vals`` [N], with
    one buffer [size] (new memory per call: an applied edit owns it): ``A = U diag(s)``
    of every layer in one product (s repeated per row of U), the norm and bias bounds
    for all layers with three dot products, ``b + db`` per layer; the layers' tensors
    are views of the buffer (A, b + db) and of ``vals`` (V).

    The bounds are the per-layer cheap ones of :func:`_fast_layer` summed over layers:
    ``(sum ||A||_F^2) (sum ||V||_F^2)`` bounds every layer's ``||A||_F^2 ||V||_F^2 >=
    ||A V^T||_F^2``, and ``sum ||db||_2^2`` every ``max|db|^2``, less :data:`_MARGIN`.
    Returns None when they are not cleared (or NaN, or a base bias storage was
    replaced): the caller then takes the per-layer path (per-layer bounds, then the
    exact checks, which name the part and value).
    """
    buf = np.empty(joint.size, dtype=np.float32)
    if joint.n_a:
        a_all = buf[: joint.n_a]
        # s of each U row [sum(out), r] (a row gather), times every U: A = U diag(s)
        s_rows = vals[joint.s].reshape(joint.s_shape).take(joint.row_layer, axis=0)
        np.multiply(vals[joint.u], s_rows.ravel(), out=a_all)
        v_all = vals[joint.v]
        if not np.dot(a_all, a_all) * np.dot(v_all, v_all) <= joint.norm2:  # NaN: True
            return None
        a_all, v_all = a_all.reshape(joint.a_shape), v_all.reshape(joint.v_shape)
    db_all = vals[joint.db]
    if db_all.size and not np.dot(db_all, db_all) <= joint.bias2:
        return None
    layers = []
    for layer in joint.layers:
        b = layer.b
        if layer.db is not None:
            if b.data_ptr() != layer.b_ptr:
                return None
            b = torch.from_numpy(np.add(layer.b_np, vals[layer.db], out=buf[layer.b_new]))
        if layer.a is None:
            layers.append(EditedLinear(layer.w, b))
        else:
            a, v = torch.from_numpy(a_all[layer.a]), torch.from_numpy(v_all[layer.v])
            layers.append(EditedLinear(layer.w, b, a, v))
    return layers


def _views(vals: np.ndarray, parts: Mapping[str, tuple[slice, tuple[int, ...]]]) -> dict:
    """part -> numpy view of ``vals`` with its shape."""
    return {p: vals[sl].reshape(shape) for p, (sl, shape) in parts.items()}


def _fast_layer(step: _Fast, vals: np.ndarray, bounds: EditBounds) -> EditedLinear:
    """One :class:`_Fast` layer of a :func:`_plan`: the checks and arithmetic of
    :func:`_prepare_layer` for a factored low-rank part and/or a bias delta, on numpy
    views of ``vals`` [N] (about ten numpy calls, ~1 us each; the Python around them
    costs as much as the arithmetic at these sizes).

    Both bounds are first checked with cheap upper bounds: ``||A||_F ||V||_F`` for
    ``||A V^T||_F`` (two dot products instead of two Gram products and their inner
    product) and ``||db||_2`` for ``max|db|`` (one dot product instead of ``abs`` and
    ``max``); only an edit they cannot clear goes to :func:`_prepare_layer`, which runs
    the exact checks and names the part and value (or accepts the edit: the cheap
    bound was a false alarm)."""
    _, w, b, b_np, u, s, v, bias, norm2, bias_abs, b_ptr = step
    a = vf = b_new = None
    if u is not None:
        a = vals[u[0]].reshape(u[1]) * vals[s[0]]  # A = U diag(s) [out, r]
        v_flat = vals[v[0]]  # V [in * r]
        # ||A V^T||_F <= ||A||_F ||V||_F: two dot products; when that bound is over the
        # limit (or NaN) the exact Gram-norm check of _prepare_layer decides
        if not np.vdot(a, a) * np.dot(v_flat, v_flat) <= norm2:
            return _slow_layer(step, vals, bounds)
        vf = v_flat.reshape(v[1])  # [in, r]
    if bias is not None:
        db = vals[bias[0]]  # [out]
        # max|db| <= ||db||_2: one dot product clears the element bound for all but
        # edits near it (those, and a replaced bias storage, take the exact path)
        if not np.dot(db, db) <= bias_abs * bias_abs or b.data_ptr() != b_ptr:
            return _slow_layer(step, vals, bounds)
        b_new = torch.from_numpy(b_np + db)
    return EditedLinear(
        w,
        b if b_new is None else b_new,
        None if a is None else torch.from_numpy(a),
        None if vf is None else torch.from_numpy(vf),
    )


def _slow_layer(step: _Fast, vals: np.ndarray, bounds: EditBounds) -> EditedLinear:
    """A :class:`_Fast` layer the cheap bounds could not clear: the exact checks."""
    parts = {p: getattr(step, p) for p in ("u", "s", "v", "bias")}
    views = _views(vals, {p: x for p, x in parts.items() if x is not None})
    return _prepare_layer(step.name, step.w, step.b, views, bounds)


# id(prototype) -> (weak reference to it, (id(head), bounds), its numpy parts, fast form)
_PROTOTYPES: dict[int, tuple[weakref.ref, tuple, dict, dict]] = {}


class _HeldLayer(NamedTuple):
    """A held prototype's layer, ready to be composed with residuals (no dense part)."""

    a: np.ndarray | None  # A = U diag(s) [out, r1], or None (no low-rank part)
    v: np.ndarray | None  # V [in, r1]
    a2: float  # ||A||_F^2
    v2: float  # ||V||_F^2
    bias: np.ndarray | None  # db [out]


def _prototype_parts(
    head: EditableHead, prototype: HeadEdit, bounds: EditBounds
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, _HeldLayer]]:
    """A held prototype's structure check, its float32 numpy parts and, per layer without
    a dense part, its :class:`_HeldLayer` (``A``, ``V`` and their squared norms): done once
    per prototype object (the device keeps it across the many residuals sent against it)."""
    key = (id(head), bounds)
    cached = _PROTOTYPES.get(id(prototype))
    if cached is not None and cached[0]() is prototype and cached[1] == key:
        return cached[2], cached[3]
    _check_structure(head, prototype, bounds)
    parts = {n: {k: _np(t) for k, t in le.parts().items()} for n, le in prototype.layers.items()}
    fast = {}
    for name, p in parts.items():
        if "dense" in p:
            continue
        a = p["u"] * p["s"] if "u" in p else None
        v = p.get("v")
        fast[name] = _HeldLayer(
            a,
            v,
            float(np.vdot(a, a)) if a is not None else 0.0,
            float(np.vdot(v, v)) if v is not None else 0.0,
            p.get("bias"),
        )
    pid = id(prototype)
    ref = weakref.ref(prototype, lambda _ref: _PROTOTYPES.pop(pid, None))
    _PROTOTYPES[pid] = (ref, key, parts, fast)
    return parts, fast


def _fast_composed(
    head: EditableHead,
    step: _Fast,
    vals: np.ndarray,
    held: _HeldLayer,
    proto_parts: Mapping[str, Mapping[str, np.ndarray]],
    bounds: EditBounds,
) -> EditedLinear:
    """:func:`_fast_layer` for ``compose(prototype, residual)`` of one layer: the factors
    concatenated along r (prototype first, as :meth:`HeadEdit.compose`), the bias deltas
    summed; the cheap norm bound from the held ``||A||^2``, ``||V||^2`` plus the residual's.
    The rank bound is checked here; a layer the cheap bounds cannot clear, or whose composed
    rank is better materialised, takes the exact path (:func:`_composed_layer`)."""
    _, w, b, b_np, u, s, v, bias, norm2, bias_abs, b_ptr = step
    a, vf, a2, v2 = held.a, held.v, held.a2, held.v2
    if u is not None:
        qa = vals[u[0]].reshape(u[1]) * vals[s[0]]  # [out, r2]
        qv = vals[v[0]].reshape(v[1])  # [in, r2]
        a2 += float(np.vdot(qa, qa))
        v2 += float(np.vdot(qv, qv))
        a = qa if a is None else np.concatenate((a, qa), axis=1)  # [out, r1 + r2]
        vf = qv if vf is None else np.concatenate((vf, qv), axis=1)  # [in, r1 + r2]
    if a is not None:
        out_f, in_f = w.shape
        r = a.shape[1]
        limit = min(bounds.max_rank, out_f, in_f)
        if r > limit:
            raise ValidationError(
                f"layer {step.name!r}: s must be 1-D of length r in 1..{limit}, got shape {(r,)}"
            )
        if not keeps_factored(out_f, in_f, r, False, bounds) or not a2 * v2 <= norm2:
            return _composed_layer(head, step, vals, proto_parts, bounds)
    db = vals[bias[0]] if bias is not None else None
    if held.bias is not None:
        db = held.bias if db is None else held.bias + db
    b_new = None
    if db is not None:
        if not np.dot(db, db) <= bias_abs * bias_abs or b.data_ptr() != b_ptr:
            return _composed_layer(head, step, vals, proto_parts, bounds)
        b_new = torch.from_numpy(b_np + db)
    return EditedLinear(
        w,
        b if b_new is None else b_new,
        None if a is None else torch.from_numpy(a),
        None if vf is None else torch.from_numpy(vf),
    )


def _composed_layer(
    head: EditableHead,
    step: _Untouched | _Fast | _General,
    vals: np.ndarray,
    proto_parts: Mapping[str, Mapping[str, np.ndarray]],
    bounds: EditBounds,
) -> EditedLinear:
    """One layer of ``compose(prototype, residual)`` on the exact path: the composition of
    :func:`_compose_arrays` (with its rank bound), then :func:`_prepare_layer`."""
    if type(step) is _Fast:
        where = {p: getattr(step, p) for p in ("u", "s", "v", "bias")}
        own = _views(vals, {p: x for p, x in where.items() if x is not None})
    elif type(step) is _General:
        own = _views(vals, step.parts)
    else:
        own = {}
    held = proto_parts.get(step.name, {})
    if not own and not held:
        return EditedLinear(step.w, step.b)
    parts = _compose_arrays(head, {step.name: held}, {step.name: own}, bounds)[step.name]
    return _prepare_layer(step.name, step.w, step.b, parts, bounds)


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
