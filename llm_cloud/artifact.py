"""The codebook LM's model directory: what is in it, how training writes it
(:func:`save_lm`) and how backends read it.

Layout (everything vLLM needs is standard Hugging Face; the rest is ours)::

    MODEL_DIR/
      config.json  generation_config.json  model.safetensors     save_pretrained
      tokenizer.json  tokenizer_config.json                       the tokenizer
      codebook/semantic_ids.npy  codebook/semantic_ids.json       the item IDs it was trained on
      item_trie.json          every valid ID as a token-id list (read by the vLLM logits processor)
      recsys_lm.json          format version, codebook source path + fingerprint, dataset,
                              split, training config and metrics, max_history, and for a
                              model whose prompts carry item text the length policy
                              ("prompt": text_items, text_tokens)
      item_text_tokens.json   that model's per-item text token ids (see llm_cloud.prompts)

A directory that is *not* ours (any HF causal LM whose tokenizer contains the codebook
tokens, e.g. a fine-tuned pretrained LLM) has no ``recsys_lm.json`` / ``codebook/``:
pass ``codebook_dir`` and the token ids are looked up in its tokenizer.

Example::

    vocab, meta = load_item_vocab("artifacts/ml-100k/lm")
    trie_file = ensure_trie_file(vocab, "artifacts/ml-100k/lm")
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_cloud.prompts import DEFAULT_MAX_HISTORY, ItemVocab
from llm_cloud.tokenizer import load_tokenizer
from recsys.errors import DataFormatError, ValidationError

if TYPE_CHECKING:
    from llm_cloud.lm_config import LMResult

logger = logging.getLogger(__name__)

META_FILE = "recsys_lm.json"
TRIE_FILE = "item_trie.json"
TEXT_FILE = "item_text_tokens.json"  # per item, its prompt text's token ids (text prompts only)
CODEBOOK_SUBDIR = "codebook"
FORMAT_VERSION = 1


def codes_fingerprint(codes: np.ndarray) -> str:
    """sha256 (first 16 hex) of the semantic-ID matrix int64 [I, L+1]: identifies a codebook."""
    arr = np.ascontiguousarray(np.asarray(codes, dtype=np.int64))
    digest = hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()
    return digest[:16]


def lm_dir(dataset_name: str, cache_dir: str | Path | None = None, split: str = "time") -> Path:
    """Default model folder: ``cache_dir()/artifacts/NAME/lm`` (``lm-loo`` for leave-one-out)."""
    from recsys import settings

    name = "lm" if split == "time" else f"lm-{split}"
    return settings.cache_dir(cache_dir) / "artifacts" / dataset_name / name


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """``recsys_lm.json`` of a model directory, or {} if it is not one of ours."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(
            path, None, f"format_version {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    return meta


def write_meta(model_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``recsys_lm.json`` (adds the format version)."""
    from codebook.io import write_json

    path = Path(model_dir) / META_FILE
    write_json(path, {"format_version": FORMAT_VERSION, **meta})
    return path


def check_model_dir(model_dir: str | Path) -> Path:
    """The directory as a Path; ValidationError unless it holds config.json + a tokenizer."""
    root = Path(model_dir).expanduser()
    if not (root / "config.json").is_file():
        raise ValidationError(
            f"{root} is not a Hugging Face model directory (no config.json); train one with "
            "`recsys train lm --dataset NAME` or pass --model"
        )
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValidationError(f"{root} has no tokenizer (tokenizer.json); save it beside the model")
    return root


def load_semantic_ids(model_dir: str | Path, codebook_dir: str | Path | None = None) -> Any:
    """The SemanticIdMap of a model: ``codebook_dir`` if given, else the copy inside it."""
    from codebook.semantic_ids import SemanticIdMap

    root = Path(model_dir)
    if codebook_dir is not None:
        ids = SemanticIdMap.load(Path(codebook_dir).expanduser())
        want = read_meta(root).get("codebook", {}).get("codes_fingerprint")
        have = codes_fingerprint(ids.codes)
        if want and want != have:
            raise ValidationError(
                f"the codebook at {codebook_dir} (fingerprint {have}) is not the one the LM in "
                f"{root} was trained with ({want}); retrain the LM or drop --codebook"
            )
        return ids
    if (root / CODEBOOK_SUBDIR / "semantic_ids.json").is_file():
        return SemanticIdMap.load(root / CODEBOOK_SUBDIR)
    raise ValidationError(
        f"{root} has no {CODEBOOK_SUBDIR}/semantic_ids.*: it is not a `recsys train lm` "
        "directory; pass the codebook directory (--codebook) whose tokens its tokenizer holds"
    )


def load_item_vocab(
    model_dir: str | Path,
    codebook_dir: str | Path | None = None,
    max_history: int | None = None,
) -> tuple[ItemVocab, dict[str, Any]]:
    """Tokenizer + semantic IDs of a model directory -> (ItemVocab, meta).

    Args:
        model_dir: ours or any HF causal-LM directory whose tokenizer has the codebook tokens.
        codebook_dir: the codebook (required when ``model_dir`` has no ``codebook/``).
        max_history: items kept per prompt; default the one the LM was trained with.
    """
    root = check_model_dir(model_dir)
    meta = read_meta(root)
    ids = load_semantic_ids(root, codebook_dir)
    tok = load_tokenizer(root)
    keep = max_history if max_history is not None else meta.get("max_history", DEFAULT_MAX_HISTORY)
    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=int(keep))
    policy = meta.get("prompt") or {}
    if policy.get("text_items"):
        vocab = _with_saved_text(vocab, root / TEXT_FILE, policy)
    return vocab, meta


def _with_saved_text(vocab: ItemVocab, path: Path, policy: dict[str, Any]) -> ItemVocab:
    """``vocab`` with the item text token ids saved beside the model (validated)."""
    from dataclasses import replace

    if not path.is_file():
        raise DataFormatError(path, None, "missing: the model's prompts need its item text")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    limit = int(policy["text_tokens"])
    ok = isinstance(rows, list) and len(rows) == vocab.num_items
    ok = ok and all(
        isinstance(r, list)
        and len(r) <= limit
        and all(isinstance(t, int) and 0 <= t < vocab.vocab_size for t in r)
        for r in rows
    )
    if not ok:
        raise DataFormatError(
            path, None, f"expected {vocab.num_items} lists of <= {limit} token ids below "
            f"{vocab.vocab_size}; re-save the model"
        )  # fmt: skip
    return replace(vocab, item_text=rows, text_items=int(policy["text_items"]), text_tokens=limit)


def write_trie_file(vocab: ItemVocab, path: str | Path) -> Path:
    """Write every valid ID as a token-id list (JSON [[t_1..t_{L+1}], ...]) to ``path``."""
    from codebook.io import atomic_write

    dest = Path(path)
    data = json.dumps(vocab.trie_paths(), separators=(",", ":")).encode("utf-8")
    atomic_write(dest, lambda fh: fh.write(data))
    return dest


def ensure_trie_file(
    vocab: ItemVocab, model_dir: str | Path, fallback_dir: str | Path | None = None
) -> Path:
    """The trie file for this vocabulary: ``MODEL_DIR/item_trie.json`` when it is current,
    else written there (or into ``fallback_dir`` if the model directory is read-only).

    The file is named by content when it cannot live in the model directory, so two
    codebooks never share one path (the vLLM processor caches tries by path).
    """
    paths = vocab.trie_paths()
    dest = Path(model_dir) / TRIE_FILE
    if dest.is_file():
        try:
            if json.loads(dest.read_text(encoding="utf-8")) == paths:
                return dest.resolve()
        except json.JSONDecodeError:
            pass
    try:
        return write_trie_file(vocab, dest).resolve()
    except OSError:
        import tempfile

        folder = Path(fallback_dir) if fallback_dir else Path(tempfile.gettempdir())
        name = f"item_trie-{codes_fingerprint(vocab.item_tokens)}.json"
        logger.info("model directory %s is read-only; trie file goes to %s", model_dir, folder)
        return write_trie_file(vocab, folder / name).resolve()


def save_lm(result: LMResult, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write a trained model's directory (the layout above); the meta file goes last, so a
    directory with ``recsys_lm.json`` is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out, safe_serialization=True)
    result.tokenizer.save_pretrained(out)
    ids = result.vocab.ids
    ids.save(out / CODEBOOK_SUBDIR)
    write_trie_file(result.vocab, out / TRIE_FILE)
    vocab = result.vocab
    prompt = {}
    if vocab.has_text:
        from codebook.io import atomic_write

        data = json.dumps(vocab.item_text, separators=(",", ":")).encode("utf-8")
        atomic_write(out / TEXT_FILE, lambda fh: fh.write(data))
        prompt = {"prompt": {"text_items": vocab.text_items, "text_tokens": vocab.text_tokens}}
    meta = {
        **(info or {}),
        "codebook": {
            **(info or {}).get("codebook", {}),
            "codes_fingerprint": codes_fingerprint(ids.codes),
            "num_items": ids.num_items,
            "vocab_sizes": ids.vocab_sizes,
        },
        "max_history": result.config.max_history,
        **prompt,
        "config": result.config.to_dict(),
        "num_parameters": result.num_parameters,
        "num_windows": result.num_windows,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "valid_metrics": result.valid_metrics,
        "train_seconds": result.seconds,
    }
    write_meta(out, meta)
    logger.info("saved codebook LM to %s", out)
    return out
