"""One command line for the library: `python -m fer_lib COMMAND [ARGS...]` (`python -m fer_lib` lists them).

Each command is the CLI of one module (`python -m fer_lib.<module>` runs the same)."""
import importlib
import sys

COMMANDS = {
    "train": "fer_lib.training.train", "evaluate": "fer_lib.analysis.evaluate",
    "explain": "fer_lib.analysis.explain", "explore": "fer_lib.analysis.explore",
    "pipeline": "fer_lib.workflow.pipeline", "jupyter": "fer_lib.workflow.jupyter",
    "checkpoints": "fer_lib.models.checkpoints", "peer": "fer_lib.models.peer", "presets": "fer_lib.training.presets",
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help") else ""
        print(f"usage: python -m fer_lib COMMAND [ARGS...]\n{given}commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2 if given or len(sys.argv) < 2 else 0)
    sys.exit(importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:]))
