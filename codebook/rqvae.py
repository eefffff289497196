"""RQ-VAE: an MLP auto-encoder whose latent is quantised by residual VQ (TIGER-style).

Shapes: I items, B batch, D input dim, E latent dim, L levels, K codes per level.

Forward pass for x [B, D] (inputs are centred and scaled by the training-set mean and
RMS norm, stored as buffers, so the loss is comparable across catalogues)::

    z   = enc(x)                                   # [B, E]
    r_1 = z;  c_l = argmin_k ||r_l - C_l[k]||;  q_l = C_l[c_l];  r_{l+1} = r_l - sg(q_l)
    z_q = sum_l q_l                                # [B, E]
    x^  = dec(z + sg(z_q - z))                     # straight-through estimator
    loss = ||x^ - x||^2 + sum_l ( ||sg(r_l) - q_l||^2 + beta ||r_l - sg(q_l)||^2 )

``sg`` is stop-gradient: the codebook term moves the codes towards the residuals, the
commitment term (weight beta) keeps the encoder close to its codes, and the
straight-through estimator passes the reconstruction gradient to the encoder as if
quantisation were the identity.

Training tricks that keep every code in use:

* k-means initialisation: before the first step, all items are encoded once (the
  first epoch's residuals) and each level's codebook is set by faiss k-means on that
  level's residuals.
* dead-code reset: every ``reset_every`` epochs a code no item used during the last
  epoch is moved onto the residual of the item that level quantises worst (so it wins
  at least that item at once); resets stop for the last ``settle_fraction`` of training
  so the final assignment is stable.

Deterministic for a given seed on a given machine (seeded init, seeded shuffling,
seeded faiss). ml-100k (1,682 x 384): ~10-20 s on 2 shared CPU cores.

Example::

    from codebook.rqvae import RQVAEConfig, train_rqvae
    q = train_rqvae(x, RQVAEConfig(levels=3, codes=64, epochs=200, seed=0))   # x [I, D]
    codes = q.encode(x)          # int64 [I, 3]
    x_hat = q.decode(codes)      # float32 [I, D]
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from codebook.quantizer import check_codes, check_vectors, default_codes, kmeans, limited_threads
from recsys.errors import DataFormatError, ValidationError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "rqvae.pt"


@dataclass
class RQVAEConfig:
    """Settings of the RQ-VAE and its training loop.

    Attributes:
        levels: L residual levels.
        codes: K codes per level; None = :func:`codebook.quantizer.default_codes`.
        latent_dim: E; TIGER uses 32. Small E makes the residual levels meaningful
            (each level removes a sizeable share of a low-dimensional residual).
        hidden: encoder widths D -> hidden[0] -> ... -> E; the decoder mirrors them.
        epochs: passes over the catalogue (200 x 7 batches for ml-100k: ~1,400 steps).
        batch_size: items per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (encoder/decoder only; codebooks have none).
        beta: commitment weight (0.25, as VQ-VAE, RQ-VAE and TIGER).
        kmeans_init: initialise each level by faiss k-means on the first epoch's residuals.
        kmeans_niter: Lloyd iterations of that initialisation.
        reset_every: dead-code reset period in epochs (0 = never).
        settle_fraction: no resets in this final share of the epochs.
        seed: seeds weights, shuffling and k-means.
        threads: torch / faiss threads while training (1 is fastest for these small
            matrices, see :func:`codebook.quantizer.limited_threads`; None = leave as is).
    """

    levels: int = 3
    codes: int | None = None
    latent_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta: float = 0.25
    kmeans_init: bool = True
    kmeans_niter: int = 20
    reset_every: int = 5
    settle_fraction: float = 0.25
    seed: int = 0
    threads: int | None = 1

    def validate(self) -> None:
        checks = {
            "levels": self.levels >= 1,
            "codes": self.codes is None or self.codes >= 1,
            "latent_dim": self.latent_dim >= 1,
            "hidden": all(int(h) >= 1 for h in self.hidden),
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "beta": self.beta >= 0,
            "reset_every": self.reset_every >= 0,
            "settle_fraction": 0.0 <= self.settle_fraction <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValidationError(
                "invalid RQVAEConfig: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            )


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ResidualVQ(nn.Module):
    """L codebooks of K vectors [E], applied to successive residuals.

    Args:
        levels: L.
        codes: K.
        dim: E.

    Example::

        rvq = ResidualVQ(levels=3, codes=16, dim=8)
        z_q, codes, loss = rvq(torch.randn(5, 8))   # [5, 8], int64 [5, 3], scalar
    """

    def __init__(self, levels: int, codes: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.levels, self.codes, self.dim, self.beta = levels, codes, dim, beta
        self.codebooks = nn.Parameter(torch.randn(levels, codes, dim) * 0.1)  # [L, K, E]

    @staticmethod
    def _nearest(r: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """r [B, E], book [K, E] -> int64 [B] (squared L2; ties -> lowest index)."""
        dist = (book * book).sum(1)[None, :] - 2.0 * r @ book.T  # [B, K]
        return dist.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, E] -> (z_q [B, E] with gradient to the codebooks, codes int64 [B, L], VQ loss)."""
        residual = z
        z_q = torch.zeros_like(z)
        codes = []
        loss = z.new_zeros(())
        for level in range(self.levels):
            book = self.codebooks[level]  # [K, E]
            idx = self._nearest(residual.detach(), book.detach())  # [B]
            q = book[idx]  # [B, E]
            loss = loss + ((residual.detach() - q) ** 2).sum(1).mean()  # codebook term
            loss = loss + self.beta * ((residual - q.detach()) ** 2).sum(1).mean()  # commitment
            z_q = z_q + q
            residual = residual - q.detach()
            codes.append(idx)
        return z_q, torch.stack(codes, dim=1), loss

    @torch.no_grad()
    def assign(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [N, E] -> (codes int64 [N, L], residuals [L, N, E] entering each level)."""
        residual = z.clone()
        codes, residuals = [], []
        for level in range(self.levels):
            residuals.append(residual.clone())
            idx = self._nearest(residual, self.codebooks[level])
            residual -= self.codebooks[level][idx]
            codes.append(idx)
        return torch.stack(codes, dim=1), torch.stack(residuals)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [N, L'] (L' <= L) -> z_q [N, E], the sum of the first L' levels' codes."""
        out = torch.zeros(codes.shape[0], self.dim, dtype=self.codebooks.dtype)
        for level in range(codes.shape[1]):
            out = out + self.codebooks[level][codes[:, level]]
        return out

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, seed: int, niter: int = 20) -> None:
        """Set every level's codebook by faiss k-means on that level's residuals of z [N, E]."""
        residual = z.detach().clone().float()
        for level in range(self.levels):
            centroids = kmeans(residual.numpy(), self.codes, seed=seed + level, niter=niter)
            self.codebooks[level].copy_(torch.from_numpy(centroids))
            idx = self._nearest(residual, self.codebooks[level])
            residual -= self.codebooks[level][idx]

    @torch.no_grad()
    def reset_dead_codes(self, z: torch.Tensor, used: torch.Tensor) -> int:
        """Move unused codes onto the worst-quantised residuals.

        Args:
            z: latents [N, E] of the catalogue (the pool new codes are drawn from).
            used: bool [L, K], which codes any item used in the last epoch.

        Returns:
            The number of codes reset. Level by level, each dead code takes the
            residual of a distinct item with the largest error at that level (items
            are re-assigned after each level's reset, so later levels see the change).
        """
        total = 0
        residual = z.detach().clone()
        for level in range(self.levels):
            book = self.codebooks[level]
            dead = torch.nonzero(~used[level]).flatten()
            if len(dead):
                idx = self._nearest(residual, book)
                err = ((residual - book[idx]) ** 2).sum(1)  # [N]
                # stable order: largest error first, ties by item index
                order = np.lexsort((np.arange(len(err)), -err.numpy()))
                take = torch.from_numpy(order[: len(dead)].copy())
                book[dead[: len(take)]] = residual[take]
                total += len(take)
            idx = self._nearest(residual, book)
            residual -= book[idx]
        return total


class RQVAE(nn.Module):
    """Encoder -> residual VQ -> decoder over item vectors [B, D].

    Example::

        model = RQVAE(dim=384, config=RQVAEConfig(codes=16))
        out = model(torch.randn(8, 384))    # dict: x_hat [8, 384], codes [8, 3], loss, ...
    """

    def __init__(self, dim: int, config: RQVAEConfig) -> None:
        super().__init__()
        if config.codes is None:
            raise ValidationError("RQVAE needs config.codes resolved (see default_codes)")
        self.config = config
        sizes = [dim, *[int(h) for h in config.hidden], config.latent_dim]
        self.encoder = _mlp(sizes)
        self.decoder = _mlp(sizes[::-1])
        self.rvq = ResidualVQ(config.levels, config.codes, config.latent_dim, config.beta)
        self.register_buffer("mean", torch.zeros(dim))  # [D] input centre
        self.register_buffer("scale", torch.ones(()))  # RMS norm of the centred inputs

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def denormalise(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.mean

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, D] (raw) -> x_hat [B, D] (normalised space), codes [B, L], recon, vq, loss."""
        xn = self.normalise(x)  # [B, D]
        z = self.encoder(xn)  # [B, E]
        z_q, codes, vq = self.rvq(z)  # [B, E], [B, L], scalar
        z_st = z + (z_q - z).detach()  # straight-through
        x_hat = self.decoder(z_st)  # [B, D]
        recon = ((x_hat - xn) ** 2).sum(1).mean()
        return {"x_hat": x_hat, "codes": codes, "recon": recon, "vq": vq, "loss": recon + vq}


class RQVAEQuantizer:
    """A trained :class:`RQVAE` behind the numpy ResidualQuantizer interface.

    Attributes:
        model: the RQVAE (eval mode).
        config: its settings.
        history: per-epoch figures: loss, recon, vq, used codes per level, resets.
    """

    method = "rqvae"

    def __init__(self, model: RQVAE, history: list[dict[str, Any]] | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.history = history or []

    @property
    def levels(self) -> int:
        return self.config.levels

    @property
    def codes(self) -> int:
        return int(self.config.codes or 0)

    @property
    def dim(self) -> int:
        return int(self.model.mean.shape[0])

    def encode(self, x: Any) -> np.ndarray:
        """Item vectors float [N, D] -> codes int64 [N, L]."""
        arr = check_vectors(x, dim=self.dim)
        with limited_threads(self.config.threads), torch.inference_mode():
            z = self.model.encoder(self.model.normalise(torch.from_numpy(arr)))
            codes, _ = self.model.rvq.assign(z)
        return codes.numpy().astype(np.int64)

    def decode(self, codes: Any) -> np.ndarray:
        """Codes int [N, L'] (first L' levels) -> reconstructed vectors float32 [N, D]."""
        arr = check_codes(codes, self.levels, self.codes)
        with limited_threads(self.config.threads), torch.inference_mode():
            z_q = self.model.rvq.lookup(torch.from_numpy(arr))
            x_hat = self.model.denormalise(self.model.decoder(z_q))
        return x_hat.numpy().astype(np.float32)

    def latent(self, x: Any) -> np.ndarray:
        """Encoder output float32 [N, E] (before quantisation)."""
        arr = check_vectors(x, dim=self.dim)
        with limited_threads(self.config.threads), torch.inference_mode():
            return self.model.encoder(self.model.normalise(torch.from_numpy(arr))).numpy()

    # ---- persistence -------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def save(self, directory: str | Path) -> None:
        """Write ``rqvae.pt``: an explicit dict {format_version, dim, config, state_dict}."""
        from codebook.io import atomic_write

        checkpoint = {
            "format_version": 1,
            "dim": self.dim,
            "config": self.config_dict(),
            "state_dict": self.model.state_dict(),
        }
        atomic_write(Path(directory) / WEIGHTS_FILE, lambda fh: torch.save(checkpoint, fh))

    @classmethod
    def load(cls, directory: str | Path, config: dict[str, Any] | None = None) -> RQVAEQuantizer:
        """Rebuild from :meth:`save`'s file (``weights_only`` loading: no pickled code runs)."""
        path = Path(directory) / WEIGHTS_FILE
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise DataFormatError(path, None, f"unreadable checkpoint ({exc}); retrain") from None
        known = set(RQVAEConfig.__dataclass_fields__)
        stored = checkpoint.get("config", config or {})
        cfg = RQVAEConfig(**{k: v for k, v in stored.items() if k in known})
        model = RQVAE(int(checkpoint["dim"]), cfg)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as exc:
            raise DataFormatError(path, None, f"weights do not fit the config ({exc})") from None
        return cls(model)


def train_rqvae(
    x: Any, config: RQVAEConfig | None = None, progress: bool = False
) -> RQVAEQuantizer:
    """Train an RQ-VAE on item vectors x [I, D]; returns the trained quantiser.

    Args:
        x: float [I, D] item vectors (numpy or torch).
        config: settings (default :class:`RQVAEConfig`); ``codes`` None is resolved
            from the item count.
        progress: show a tqdm bar over epochs.
    """
    cfg = config or RQVAEConfig()
    cfg.validate()
    data = torch.from_numpy(check_vectors(x).copy())  # [I, D]
    num_items = data.shape[0]
    if cfg.codes is None:
        cfg.codes = default_codes(num_items, cfg.levels)
    if cfg.codes > num_items:
        raise ValidationError(
            f"codes K={cfg.codes} exceeds the {num_items} items; use K <= {num_items}"
        )
    with limited_threads(cfg.threads):
        return _train(data, cfg, progress)


def _train(data: torch.Tensor, cfg: RQVAEConfig, progress: bool) -> RQVAEQuantizer:
    """The training loop of :func:`train_rqvae` (inputs validated, K resolved)."""
    assert cfg.codes is not None
    num_items, dim = data.shape
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG state
        torch.manual_seed(cfg.seed)
        model = RQVAE(dim, cfg)
    centred = data - data.mean(0)
    model.mean.copy_(data.mean(0))
    model.scale.copy_(centred.pow(2).sum(1).mean().sqrt().clamp_min(1e-8))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.startswith("rvq.") or p.ndim < 2 else decay).append(p)
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.kmeans_init:
        with torch.no_grad():
            model.rvq.init_kmeans(model.encoder(model.normalise(data)), cfg.seed, cfg.kmeans_niter)
    last_reset = int(cfg.epochs * (1.0 - cfg.settle_fraction))
    history: list[dict[str, Any]] = []
    epochs = range(cfg.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="rq-vae", unit="epoch")
    for epoch in epochs:
        model.train()
        used = torch.zeros(cfg.levels, cfg.codes, dtype=torch.bool)
        totals = {"loss": 0.0, "recon": 0.0, "vq": 0.0}
        perm = torch.randperm(num_items, generator=gen)
        for begin in range(0, num_items, cfg.batch_size):
            batch = data[perm[begin : begin + cfg.batch_size]]  # [B, D]
            out = model(batch)
            optim.zero_grad(set_to_none=True)
            out["loss"].backward()
            optim.step()
            for level in range(cfg.levels):
                used[level, out["codes"][:, level]] = True
            for key in totals:
                totals[key] += float(out[key].detach()) * len(batch)
        resets = 0
        if cfg.reset_every and (epoch + 1) % cfg.reset_every == 0 and epoch + 1 < last_reset:
            model.eval()
            with torch.no_grad():
                resets = model.rvq.reset_dead_codes(model.encoder(model.normalise(data)), used)
        row = {k: v / num_items for k, v in totals.items()}
        row.update(epoch=epoch, used=used.sum(1).tolist(), resets=resets)
        history.append(row)
        if resets:
            logger.debug("epoch %d: reset %d dead codes", epoch, resets)
    quantizer = RQVAEQuantizer(model, history)
    last = history[-1]
    logger.info(
        "rq-vae trained on [%d, %d] in %.1f s: loss %.4f (recon %.4f, vq %.4f), used %s of %d",
        num_items, dim, time.perf_counter() - start, last["loss"], last["recon"], last["vq"],
        last["used"], cfg.codes,
    )  # fmt: skip
    return quantizer
