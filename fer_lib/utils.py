"""Small shared helpers: atomic writes, seeding, run provenance, choice validation, progress bars.

Every module writes results through `atomic_write_*` so that a run killed mid-write
leaves the previous file intact, and stamps results with `run_info()` so each file
says which code version and configuration produced it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import math
import numbers
import os
import random
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """Marks the project's errors that a user can fix (configuration, data layout, labels, images, checkpoints).

    Command-line entry points report them as one line (`run_cli`), never as a traceback.
    """


class ConfigError(UserError, ValueError):
    """An invalid parameter; raised before any work starts, listing the valid choices."""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return `value` if it is one of `choices`, else raise ConfigError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")
    return value


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; results are for every reader
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:  # a full disk: name the file being written, not an anonymous temporary
        if exc.filename in (None, str(tmp_path)) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, sort_keys=False) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_csv(path: str | os.PathLike, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write_text(path, frame.to_csv(index=False))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (if imported) so CPU runs are repeatable."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency in practice
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def git_revision(short: bool = True) -> str:
    """The repository's current commit (with '-dirty' when it has uncommitted changes), or 'unknown'."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "fer_lib"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def repo_relative(obj: Any) -> Any:
    """`obj` with this checkout's absolute path written relative to the repository ("results/x", not
    "/home/me/fer/results/x"), in strings, lists, tuples (given back as lists, as JSON writes them) and
    dicts: results files stay portable. The root itself becomes "."; paths outside it stay as they are."""
    root = str(REPO_ROOT)
    if isinstance(obj, (str, Path)):
        text = str(obj)
        if text == root:
            return "."
        return text.replace(root + os.sep, "") if root + os.sep in text else (obj if isinstance(obj, str) else text)
    if isinstance(obj, (list, tuple)):
        return [repo_relative(v) for v in obj]
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    return obj


def portable_path(path: str | os.PathLike) -> str:
    """How a results file records `path`: relative to the repository root when it lies inside it
    (whatever the current folder: "../results/x" from notebooks/ gives "results/x"), else absolute."""
    absolute = os.path.abspath(path)
    for candidate in (absolute, os.path.realpath(absolute)):
        if candidate == str(REPO_ROOT) or candidate.startswith(str(REPO_ROOT) + os.sep):
            return Path(os.path.relpath(candidate, REPO_ROOT)).as_posix()
    return absolute


def repo_path(path: str | os.PathLike) -> Path:
    """A recorded path made usable from any current folder: relative ones are taken from the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def run_info(config: Any = None, **extra: Any) -> dict[str, Any]:
    """Provenance block stamped into every results file: time, code version, host, config."""
    import platform

    info: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    if config is not None:
        info["config"] = repo_relative(json.loads(json.dumps(config, default=_json_default)))
    info.update(extra)
    return info


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(obj: Any, length: int = 10) -> str:
    """Stable short hash of a JSON-serialisable configuration (used for run ids and cache keys)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return sha256_bytes(text.encode())[:length]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, holder: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `path` for the block: the project's one lock.

    blocking=True waits for other holders (shared caches built once); blocking=False refuses at
    once with `LockHeld`, naming the holder that the current owner wrote into the file (runs,
    pipelines: one process per folder). The lock dies with its process, so no stale lock remains.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            raise LockHeld(path, fh.read().strip()) from None
        try:
            if holder:
                fh.seek(0)
                fh.truncate()
                fh.write(holder)
                fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class LockHeld(UserError):
    """Another process holds the lock that `file_lock(..., blocking=False)` refused to wait for."""

    def __init__(self, path: Path, holder: str = ""):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by another process ({holder or 'holder unknown'}); "
                         "wait for it to finish or stop it, then rerun")


# --------------------------------------------------------------------------- validation
def check_number(name: str, value: Any, *, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None) -> Any:
    """Return `value` if it is a finite number (an int when integer=True) within the bounds
    (minimum <= value, above < value, value <= maximum); else raise ConfigError naming what is accepted."""
    kind = "an integer" if integer else "a finite number"
    bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
              f"<= {maximum}" if maximum is not None else ""]
    wanted = kind + "".join(f" {b}" for b in bounds if b and b.strip())
    ok = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {wanted}")
    return value


def resolve_device(device: "str | torch.device | None" = None, index: int | None = None) -> "torch.device":
    """The project's one device rule: 'auto'/None/'' -> CUDA when available (device `index` if
    given) else CPU; 'cpu', 'cuda', 'cuda:N' as given, and CUDA without a GPU is an error."""
    import torch

    if device is None or (isinstance(device, str) and device in ("", "auto")):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; valid choices: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} but no CUDA GPU is available; valid choices here: auto, cpu")
    if dev.type == "cuda" and dev.index is None and index is not None:
        dev = torch.device("cuda", index)
    return dev


# --------------------------------------------------------------------------- command-line errors
#: what to do about an OS error, by errno (the file is named in the message)
_OS_ADVICE: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space there or write to another folder (the previous file is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space there or write to another folder",
    errno.EFBIG: "the file grew past the size this system allows: free space or raise the limit, or write elsewhere",
    errno.EACCES: "permission denied: check the file's permissions or choose another path",
    errno.EPERM: "operation not permitted: check the file's permissions or choose another path",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "expected a file but this is a folder: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer workers",
    errno.EIO: "input/output error: the disk or network drive failed; check it and rerun",
}


def os_error_message(exc: OSError) -> str:
    """One line for an OS error: the file, what happened and what to do."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    advice = _OS_ADVICE.get(exc.errno or -1)
    what = exc.strerror or str(exc) or type(exc).__name__
    text = f"{where}: {what}" if where else what
    return f"{text}; {advice}" if advice else text


def error_line(exc: BaseException) -> str:
    """The one line a command prints for an error a user can fix (newlines folded)."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError):
        text = os_error_message(exc)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_cli(body: Callable[[], int], debug: bool = False, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body: the project's errors (UserError, `user_errors`) and OS errors (a full disk, a missing
    or unwritable file) become one line `error: ...` on stderr and exit status 2; Ctrl-C exits 130.

    `debug=True` (the commands' --debug flag) prints the traceback too. Other exceptions are
    bugs and propagate with their traceback.
    """
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (UserError, OSError, *user_errors) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {error_line(exc)}" + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- progress bars

PROGRESS_ENV = "FER_LIB_PROGRESS"   # 0: no progress bars; 1: always; unset: in JupyterLab or on a terminal


def _in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), where tqdm.auto draws widget bars."""
    if "ipykernel.zmqshell" not in sys.modules or "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except Exception:  # noqa: BLE001 - an odd IPython: treat as no kernel
        return False
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_wanted() -> bool:
    """Whether loops show progress bars. FER_LIB_PROGRESS=0 turns them off (the pipeline sets it for the
    notebooks it executes, so saved notebooks hold no bar text) and =1 on; unset, bars show in a Jupyter
    kernel (live widgets) and when stderr is a terminal, not in logs or redirected output."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    if _in_jupyter_kernel():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # no stderr, or a closed one
        return False


def progress_bar(iterable: Iterable | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar over `iterable` (tqdm's keyword arguments; `disable=True` still turns it off): tqdm.auto's
    (a widget in JupyterLab, text on a terminal) where `progress_wanted()`, else a silent bar. Either way
    it iterates, updates and closes like any tqdm bar."""
    if tqdm_kwargs.get("disable") or not progress_wanted():
        from tqdm.std import tqdm as silent

        return silent(iterable, **{**tqdm_kwargs, "disable": True})
    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)   # without ipywidgets: text bars, not the IProgress warning
        from tqdm.auto import tqdm
    return tqdm(iterable, **tqdm_kwargs)
