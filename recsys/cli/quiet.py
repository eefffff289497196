"""What the ``recsys`` command line writes to stderr: quiet by default, ``-v`` for more.

:func:`configure` is called once per command by :func:`recsys.cli.main`, before any
heavy library is imported, and nowhere else: library code never configures logging or
warnings. Progress bars and printed results are not logging; they always show.

Verbosity (the count of ``-v``):

* 0 (default): WARNING and above from every package, plus the one INFO line a server
  owes its user (:data:`USER_FACING`: "listening on HOST:PORT"); the known third-party
  chatter below is dropped. Our own per-stage INFO lines ("reusing prepared ml-100k",
  "saved codebook ...") wait for ``-v``.
* 1 (``-v``): INFO from every package, ours and third-party, nothing dropped.
* 2 (``-vv``): DEBUG from every package.

Where the noise comes from (measured with torch 2.13, torchrec / fbgemm-gpu 1.8,
transformers 5.24, alembic 1.20) and what handles it:

* fbgemm_gpu logs ``Successfully loaded: '<lib>.so'`` for each of its ~14 libraries
  with ``logging.info`` on the *root* logger when torchrec imports it; alembic logs its
  plugin set-up, ``Context impl SQLiteImpl.`` and ``Will assume transactional DDL.``;
  faiss.loader logs each CPU-feature library it tries. All are Python logging at INFO
  (no native code writes to stderr at import: checked with ``import torchrec``, faiss,
  grpc), so the level of our handler drops them; no TORCH_CPP_LOG_LEVEL or glog setting
  is needed.
* torch.fx logs a once-per-process deprecation notice at WARNING through torch's own
  handler when torchrec calls ``is_fx_tracing`` (:data:`KNOWN_LOG_NOISE`).
* transformers draws tqdm bars while it loads or saves weights ("Loading weights",
  "Writing model shards") and warns about renamed arguments (:data:`KNOWN_WARNINGS`).

Child processes inherit environment variables but not Python's logging or warnings
set-up: :data:`QUIET_ENV` (set here, before the libraries that read them are imported)
keeps multiprocessing "spawn" workers and other Python children quiet too; server
children started by :mod:`recsys.serving.process` run ``recsys`` and come through here
themselves. A variable the user has set is left alone, and so is an explicit ``-W`` /
``PYTHONWARNINGS`` choice of warning filters.

Example::

    from recsys.cli import quiet

    quiet.configure(args.verbose)      # first thing after parsing the command line
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import TextIO

logger = logging.getLogger(__name__)

OWN_PACKAGES = ("recsys", "codebook", "device_ranker", "llm_cloud")
# loggers whose INFO lines are a command's output rather than progress notes
USER_FACING = ("recsys.serving.server",)  # "listening on 127.0.0.1:PORT (...)", "stopped"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"


@dataclass(frozen=True)
class KnownWarning:
    """A third-party warning ``warnings.filterwarnings`` ignores at the default verbosity.

    ``message`` is a literal prefix of the warning's text; ``module`` a module name whose
    submodules count too (empty: any). ``why`` says where it comes from."""

    category: type[Warning]
    message: str
    module: str
    why: str

    def in_process(self) -> None:
        module = rf"{re.escape(self.module)}(\.|$)" if self.module else ""
        warnings.filterwarnings("ignore", re.escape(self.message), self.category, module)

    def env_entry(self) -> str | None:
        """The ``PYTHONWARNINGS`` form (exact module names only there, so only the
        module-free entries can be passed on to children)."""
        if self.module or any(c in self.message for c in ":,"):
            return None
        return f"ignore:{self.message}:{self.category.__name__}"


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(DeprecationWarning, "", "fbgemm_gpu", "its own deprecated modules, at import"),
    KnownWarning(DeprecationWarning, "", "torchrec", "deprecated torch / fbgemm APIs it calls"),
    KnownWarning(
        FutureWarning,
        "`past_key_values` is deprecated",
        "",
        "transformers 5.x renamed the KV-cache argument `cache`; llm_cloud.backends.hf "
        "passes the new name where the model takes it, other callers may not",
    ),
)

# (logger, message prefix): once-per-process third-party notices that say nothing to a user
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    # torchrec calls torch.fx.is_fx_tracing, which torch 2.13 deprecates at WARNING
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
    # transformers' logger twin of the FutureWarning above
    ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated"),
)

# read by the libraries when they are imported, and inherited by child processes
QUIET_ENV: dict[str, str] = {
    "TORCH_LOGS": "-torch.fx._symbolic_trace",  # "-": that logger at ERROR (children)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight loading / saving bars
}


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Gate(logging.Filter):
    """Our packages and third parties may have different thresholds; the
    :data:`USER_FACING` loggers always pass INFO."""

    def __init__(self, own: int, other: int) -> None:
        super().__init__()
        self.own, self.other = own, other

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if _is_under(name, USER_FACING):
            return record.levelno >= min(self.own, logging.INFO)
        own = name.split(".", 1)[0] in OWN_PACKAGES
        return record.levelno >= (self.own if own else self.other)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _is_under(name: str, parents: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


@dataclass
class _Applied:
    """What the last :func:`configure` changed, undone by the next call (tests run many
    commands in one process). Warning filters stay (adding them again is a no-op), so
    ``-v`` after a quiet command in the same process still ignores them."""

    handler: logging.Handler | None = None
    other: int = logging.WARNING  # third parties' threshold
    levels: tuple[tuple[logging.Logger, int], ...] = ()  # (logger, level before)
    log_filters: tuple[tuple[logging.Logger, logging.Filter], ...] = ()
    env: tuple[str, ...] = ()


_applied = _Applied()


def levels(verbosity: int) -> tuple[int, int]:
    """(our packages' threshold, third parties' threshold) for ``verbosity`` (-v count)."""
    if verbosity <= 0:
        return logging.WARNING, logging.WARNING
    if verbosity == 1:
        return logging.INFO, logging.INFO
    return logging.DEBUG, logging.DEBUG


def configure(verbosity: int = 0) -> None:
    """Set up stderr logging and warning filters for a command (see the module docstring).

    Installs one handler on the root logger (replacing the one an earlier call
    installed; other handlers, e.g. pytest's, are left alone) and sets the root level;
    at verbosity 0 the :data:`USER_FACING` loggers get INFO, :data:`KNOWN_LOG_NOISE` is
    dropped, :data:`KNOWN_WARNINGS` are ignored and :data:`QUIET_ENV` is exported.
    """
    reset()
    own, other = levels(verbosity)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.addFilter(_Gate(own, other))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(own, other))
    _applied.handler, _applied.other = handler, other
    if verbosity > 0:
        return
    raised = []
    for name in USER_FACING:
        target = logging.getLogger(name)
        raised.append((target, target.level))
        target.setLevel(logging.INFO)
    _applied.levels = tuple(raised)
    noise = []
    for name, prefix in KNOWN_LOG_NOISE:  # on the logger: torch and transformers log
        drop = _DropPrefix(prefix)  # through handlers of their own, not ours
        target = logging.getLogger(name)
        target.addFilter(drop)
        noise.append((target, drop))
    _applied.log_filters = tuple(noise)
    _applied.env = tuple(_export_env())
    if not sys.warnoptions:  # an explicit -W / PYTHONWARNINGS choice wins
        for known in KNOWN_WARNINGS:
            known.in_process()


def adopt(standalone: logging.Logger) -> None:
    """Give a library's stand-alone logger (made with ``logging.Logger(name)``, outside
    logging's tree, so the root handler never sees it; e.g. ``pooch.get_logger()``) the
    third-party threshold of the current command. For a command to call once it has
    imported that library."""
    standalone.setLevel(_applied.other)


def _export_env() -> list[str]:
    """Set :data:`QUIET_ENV` and the children's ``PYTHONWARNINGS`` where the user has
    not; returns the names set."""
    wanted = dict(QUIET_ENV)
    entries = [e for e in (k.env_entry() for k in KNOWN_WARNINGS) if e]
    if entries:
        wanted["PYTHONWARNINGS"] = ",".join(entries)
    done = []
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value
            done.append(name)
    return done


def reset() -> None:
    """Undo what the last :func:`configure` did (handler, levels, log filters, the
    environment variables it set); warning filters stay."""
    if _applied.handler is not None:
        logging.getLogger().removeHandler(_applied.handler)
    for target, level in _applied.levels:
        target.setLevel(level)
    for target, drop in _applied.log_filters:
        target.removeFilter(drop)
    for name in _applied.env:
        os.environ.pop(name, None)
    _applied.handler, _applied.levels, _applied.log_filters, _applied.env = None, (), (), ()


__all__ = [
    "KNOWN_LOG_NOISE",
    "KNOWN_WARNINGS",
    "QUIET_ENV",
    "USER_FACING",
    "adopt",
    "configure",
    "levels",
    "reset",
]
