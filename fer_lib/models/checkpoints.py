"""Checkpoint files are data, never code: every model, checkpoint or weights file is read
without unpickling arbitrary objects.

- `load_file(path)`: a `.safetensors` file, or a torch file read with `torch.load(...,
  weights_only=True)` (tensors, dicts, lists, numbers, strings only). A file that needs more
  (an old fer_lib checkpoint holding numpy RNG states, a foreign pickle, a malicious one) is
  refused with `UnsafeCheckpointError`, which names the file and the one opt-in: `trust=True`
  (`--trust-checkpoint` on the command line) for a file the user made themselves.
- `to_plain(obj)`: what fer_lib writes into a checkpoint besides tensors: numpy arrays and tuples
  become lists, numpy scalars numbers, dataclasses dicts (RNG states: `plain_rng_state`), so its
  checkpoints load safely.
- Shipped checkpoints (`fer_lib/shipped/`, installed with the package): fp16 safetensors weights plus a JSON model
  card holding the model config, recipe and metrics. `save_shipped` / `read_shipped` write and
  read that pair; `shipped_checkpoints()` lists them by name.
- `convert(old, new)`: rewrites an old fer_lib checkpoint (after an explicit trust) in the safe
  format: `python -m fer_lib.models.checkpoints convert OLD.pt NEW.pt --trust-checkpoint`.
- `ship(checkpoint, name, evaluation, card)`: a training checkpoint as a shipped one:
  `python -m fer_lib.models.checkpoints ship runs/x/checkpoints/best.pt NAME --evaluation eval.json`;
  `python -m fer_lib.models.checkpoints list` lists them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fer_lib.utils import REPO_ROOT, ConfigError, atomic_path, atomic_write_json, run_cli

#: where the package keeps its shipped checkpoints (`<name>.safetensors` + `<name>.json`)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped"
#: the command-line opt-in named in every refusal
TRUST_FLAG = "--trust-checkpoint"


class UnsafeCheckpointError(ConfigError):
    """A file that could run code when loaded (it needs arbitrary unpickling); refused."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read (missing, corrupt, or not what fer_lib writes)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Neither a file nor the name of a shipped checkpoint."""


def to_plain(obj: Any) -> Any:
    """`obj` with numpy arrays as tensors and numpy scalars, tuples, dataclasses and Paths as plain
    values, so that `torch.load(..., weights_only=True)` reads it back."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):  # metrics (confusion matrices, ...): JSON-friendly lists
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # exact built-ins (torch.__version__ is a str subclass)
        if isinstance(obj, kind):
            return kind(obj)
    raise TypeError(f"{type(obj).__name__} cannot go into a safe checkpoint; convert it to plain data first")


def _refusal(path: Path, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refused to load {path}: it is not plain tensor data ({reason}); loading it could run code. "
        f"fer_lib checkpoints written since this version load safely. If you made this file yourself, opt in "
        f"with {TRUST_FLAG} (trust=True in Python), or rewrite it once in the safe format: "
        f"python -m fer_lib.models.checkpoints convert {path} NEW.pt {TRUST_FLAG}")


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", trust: bool = False) -> Any:
    """Read a .safetensors or torch file without running code (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device=str(map_location))
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {path} ({exc}); it is corrupt or truncated") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(f"could not read checkpoint {path} ({type(exc).__name__}: {str(exc)[:300]}); it is corrupt, "
                                  f"truncated or not a torch file") from exc
        if not trust:
            raise _refusal(path, _unpickling_reason(exc)) from None
    # explicit opt-in only: the one place in fer_lib that unpickles arbitrary objects
    try:
        return torch.load(path, map_location=map_location, weights_only=False)  # trusted by the user
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names what the file wanted to unpickle."""
    lines = [l.strip() for l in str(exc).splitlines() if "GLOBAL" in l or "Unsupported" in l]
    return (lines[0] if lines else str(exc).splitlines()[0])[:240]


# --------------------------------------------------------------------------- shipped checkpoints
def save_shipped(path: str | os.PathLike, state: dict[str, torch.Tensor], card: dict[str, Any],
                 dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """Write `<path>.safetensors` (floating tensors as `dtype`) and `<path>.json` (the model card) atomically."""
    from safetensors.torch import save_file

    base = Path(path).with_suffix("")
    weights = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in state.items()}
    weights_path, card_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    with atomic_path(weights_path) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "card": card_path.name})
    atomic_write_json(card_path, to_json(card))
    return weights_path, card_path


def to_json(obj: Any) -> Any:
    """Plain data for JSON (tensors as lists)."""
    plain = to_plain(obj)

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(plain)


def read_shipped(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A shipped checkpoint as a fer_lib checkpoint dict: model_state (float32), model_config, card."""
    base = Path(path).with_suffix("")
    weights_path, card_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    if not card_path.is_file():
        raise CheckpointError(f"{weights_path} has no model card {card_path}; a shipped checkpoint is the pair")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the model card {card_path}: {exc}") from exc
    if not isinstance(card, dict) or not isinstance(card.get("model_config"), dict):
        raise CheckpointError(f"{card_path} is not a fer_lib model card (needs 'model_config')")
    state = load_file(weights_path, map_location=map_location)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return {"model_state": state, "model_config": card["model_config"], "card": card,
            "config": card.get("train_config", {}), "epoch": card.get("epoch")}


def shipped_checkpoints(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Name -> path (`.safetensors`) of every shipped checkpoint (its model card beside it)."""
    root = Path(folder) if folder is not None else SHIPPED_DIR
    if not root.is_dir():
        return {}
    return {p.stem: p for p in sorted(root.glob("*.safetensors")) if p.with_suffix(".json").is_file()}


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A checkpoint path, or the path of a shipped checkpoint given by name; errors list the names."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = shipped_checkpoints()
    if str(spec) in shipped:
        return shipped[str(spec)]
    names = ", ".join(shipped) or "none are installed"
    raise CheckpointNotFoundError(f"checkpoint not found: {spec} is neither a file nor a shipped checkpoint name "
                                  f"(shipped: {names}; fer_lib.models.shipped_checkpoints())")


def read_checkpoint(spec: str | os.PathLike, map_location: str | torch.device = "cpu",
                    trust: bool = False) -> dict[str, Any]:
    """Any fer_lib checkpoint (training .pt, shipped .safetensors + .json, or a shipped name) as a dict
    with at least `model_state` and `model_config`; refuses files that are not plain data."""
    path = resolve_checkpoint(spec)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        hint = f"; did you mean {best}?" if best.is_file() else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if path.suffix in (".safetensors", ".json"):
        return read_shipped(path, map_location)
    ckpt = load_file(path, map_location=map_location, trust=trust)
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a fer_lib checkpoint (it needs 'model_state' and 'model_config'; "
                              f"give the .pt written by fer_lib.training.train, a shipped .safetensors, or a shipped name)")
    return ckpt


#: what every shipped FER2013 model card says about the data's terms
FER2013_TERMS = ("Trained on FER2013 (Goodfellow et al., 2013; ICML 2013 Challenges in Representation Learning), "
                 "which is distributed for research use only: use this model for research, not in products.")


def ship(checkpoint: str | os.PathLike, name: str, evaluation: dict[str, Any] | None = None,
         card: dict[str, Any] | None = None, folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write a training checkpoint as a shipped one: `<folder>/<name>.safetensors` (fp16 weights) and
    `<name>.json`, the model card (model config, recipe, protocol, metrics, data terms, provenance)."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"a shipped name takes letters, digits, '_' and '-' only, got {name!r}")
    ckpt = read_checkpoint(checkpoint)
    keys = ("n", "accuracy", "macro_f1", "per_class_accuracy", "att_cos", "att_cos_mean", "cam_cos", "cam_n_valid",
            "n_valid_maps", "dataset", "split", "confusion")
    info = {"name": name, "model_config": ckpt["model_config"], "train_config": ckpt.get("config"),
            "epoch": ckpt.get("epoch"), "source_run": (ckpt.get("run") or {}).get("git_revision"),
            "metrics": {k: evaluation[k] for k in keys if evaluation and k in evaluation},
            **(card or {})}
    root = Path(folder) if folder is not None else SHIPPED_DIR
    return save_shipped(root / name, ckpt["model_state"], info)


def convert(old: str | os.PathLike, new: str | os.PathLike, trust: bool = False) -> Path:
    """Rewrite an old fer_lib checkpoint (read only with trust=True) as plain data that loads safely."""
    if not trust:
        raise UnsafeCheckpointError(f"converting {old} unpickles it: confirm that you made it with "
                                    f"{TRUST_FLAG} (trust=True)")
    ckpt = load_file(old, trust=True)
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise CheckpointError(f"{old} is not a fer_lib checkpoint (no 'model_state')")
    rng = ckpt.get("rng_state")
    if isinstance(rng, dict):
        ckpt["rng_state"] = plain_rng_state(rng)
    safe = to_plain(ckpt)
    with atomic_path(new) as tmp:
        torch.save(safe, tmp)
    torch.load(new, map_location="cpu", weights_only=True)  # proves it now loads safely
    return Path(new)


def plain_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states (torch, numpy, python, cuda) as tensors and lists (see `restore_rng_state`)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "numpy" and isinstance(value, tuple):
            name, keys, pos, has_gauss, cached = value
            out[key] = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        elif key == "python" and isinstance(value, tuple):
            version, internal, gauss = value
            out[key] = {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss}
        else:
            out[key] = value
    return out


def restore_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `plain_rng_state`: the objects numpy's and python's `set_state` expect."""
    out = dict(state)
    npy = state.get("numpy")
    if isinstance(npy, dict):
        keys = npy["keys"].numpy() if isinstance(npy["keys"], torch.Tensor) else np.asarray(npy["keys"])
        out["numpy"] = (npy["name"], keys.astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
                        float(npy["cached_gaussian"]))
    py = state.get("python")
    if isinstance(py, dict):
        out["python"] = (int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`convert OLD NEW --trust-checkpoint`, or `list` the shipped checkpoints."""
    parser = argparse.ArgumentParser(prog="python -m fer_lib.models.checkpoints", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="rewrite an old fer_lib checkpoint in the safe format")
    conv.add_argument("old")
    conv.add_argument("new")
    conv.add_argument(TRUST_FLAG, dest="trust", action="store_true", help="I made OLD myself: unpickle it once")
    sub.add_parser("list", help="list the shipped checkpoints")
    shp = sub.add_parser("ship", help="write a training checkpoint as a shipped one (fp16 safetensors + model card)")
    shp.add_argument("checkpoint")
    shp.add_argument("name")
    shp.add_argument("--evaluation", help="JSON of python -m fer_lib.analysis.evaluate for this checkpoint (metrics)")
    shp.add_argument("--card", help="JSON object merged into the model card (protocol, recipe, terms, ...)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_cli(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    if args.command == "list":
        for name, path in shipped_checkpoints().items():
            card = json.loads(path.with_suffix(".json").read_text())
            acc = (card.get("metrics") or {}).get("accuracy")
            print(f"{name:28s} {card['model_config'].get('backbone')}  accuracy {acc if acc is None else f'{acc:.4f}'}"
                  f"  {path}")
        return 0
    if args.command == "ship":
        evaluation = json.loads(Path(args.evaluation).read_text()) if args.evaluation else None
        card = json.loads(args.card) if args.card else None
        weights, card_path = ship(args.checkpoint, args.name, evaluation, card)
        print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB) and {card_path}")
        return 0
    out = convert(args.old, args.new, trust=args.trust)
    print(f"wrote {out} (loads with weights_only=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
