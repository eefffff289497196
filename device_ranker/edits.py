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

Application (validation and the factored head weights, :func:`prepare_edit`,
:func:`prepare_decoded`, :class:`PreparedEdit`) lives in :mod:`device_ranker.edit_apply`;
the names are re-exported here.

Example::

    head = EditableHead((64, 128, 64))
    edit = HeadEdit({"fc0": LayerEdit(u=torch.randn(128, 4) * 0.01, s=torch.ones(4),
                                      v=torch.randn(64, 4) * 0.01)})
    prepared = prepare_edit(head, edit, EditBounds())   # device_ranker.edit_apply
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


_APPLY_NAMES = (
    "PreparedEdit",
    "keeps_factored",
    "prepare_decoded",
    "prepare_edit",
    "validate_edit",
)


def __getattr__(name: str):
    """``from device_ranker.edits import prepare_edit`` keeps working: the application
    half lives in :mod:`device_ranker.edit_apply` (imported on first use, after this
    module, which it builds on)."""
    if name in _APPLY_NAMES:
        from device_ranker import edit_apply

        return getattr(edit_apply, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
