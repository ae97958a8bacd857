"""What the lab's command lines share: bad input is refused before anything runs, in one line on stderr
("prog: error: ARGUMENT: what is wrong; valid: ..."), with exit status 2 and nothing written.

    parser = cli.ArgumentParser(prog="python -m profiling.trace")
    parser.add_argument("--calls", type=cli.positive_int, default=5)    # static checks: argparse types, choices=
    args = parser.parse_args(argv)
    cli.check_device(parser, "--device", args.device)                  # checks that depend on the machine
    cli.check_backend(parser, "--backend", "moe", args.backend, "cpu", torch.float32)
    cli.check_writable(parser, "--out", args.out)                      # before the first timed call

It sits in model/, below the bench (bench.cli re-exports it): the model's CLIs (model.generate, model.train) use
it without importing the bench, which imports the model. `backend_problem` and `runnable` answer "can backend B
run op on this device and dtype here" for any CLI (bench.sweep included); `model_backend_problem` the same for
the Qwen3.5 model, whose backend name applies to each of its ops that has it. `checkpoint_config` reads a
checkpoint's config.json or refuses it. Light on import: torch and the registry load when a check needs them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEVICES = ("cpu", "cuda")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with every error (argparse's own, and the checks below through `error`) one line on
    stderr and exit status 2: the usage block stays behind --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


# ------------------------------------------------------------------------------------- argparse types

def positive_int(text: str) -> int:
    """A count that must be >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """A count that may be 0 (argparse type)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A quantity (seconds, ...) that must be > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def nonempty_text(text: str) -> str:
    """Text with at least one character that is not white space (argparse type)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty prompt {text!r}: give some text")
    return text


def token_ids(text: str) -> list[int]:
    """Token ids separated by spaces or commas, at least one, each >= 0 (argparse type; the vocabulary's upper
    bound is the model's, checked once it is known)."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise argparse.ArgumentTypeError(f"empty prompt {text!r}: give token ids separated by spaces or commas")
    try:
        ids = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids (integers >= 0), got {text!r}") from None
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {min(ids)}")
    return ids


def existing_file(text: str) -> Path:
    """A file that must exist (argparse type)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    return path


def existing_folder(text: str) -> Path:
    """A folder that must exist (argparse type)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no folder at {path}" + (" (it is a file)" if path.exists() else ""))
    return path


SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below it


def seed(text: str) -> int:
    """A random seed in [0, 2**64) (argparse type; torch's generators take no more bits)."""
    value = _int_at_least(text, 0)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**64 = {SEED_LIMIT}, got {value}")
    return value


def out_folder(text: str) -> Path:
    """A folder to write into: it may not exist yet (it is made when something is written), but must not be a
    file (argparse type)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


# ------------------------------------------------------------------------------- checks of the machine

def writable_problem(folder: Path) -> str | None:
    """Why nothing can be written into folder (made if missing), or None: tried with a temporary file where the
    folder exists, else the permissions of its nearest existing parent. Nothing is left behind."""
    import os
    import tempfile

    folder = Path(folder)
    if folder.is_dir():
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            return f"{folder} is not writable ({exc.strerror})"
        return None
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{folder} cannot be made: {parent} is not writable"
    return None


def check_writable(parser: argparse.ArgumentParser, argument: str, folder: Path | None) -> None:
    """Refuse `argument` when its folder cannot be written (None passes): before the work, not after it."""
    if folder is not None and (problem := writable_problem(folder)):
        parser.error(f"{argument}: {problem}")


def checkpoint_config(parser: argparse.ArgumentParser, argument: str, folder: Path):
    """The model.config.ModelConfig of checkpoint folder; refused (one line, exit 2) when its config.json is no
    JSON, not a Qwen3.5-MoE config (model_type), or has values the model cannot take."""
    import json

    from model.config import ModelConfig

    path = Path(folder) / "config.json"
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        parser.error(f"{argument}: {path} is not valid JSON (line {exc.lineno}: {exc.msg})")
    except OSError as exc:
        parser.error(f"{argument}: {path} cannot be read ({exc.strerror})")
    except (TypeError, ValueError, AttributeError) as exc:
        parser.error(f"{argument}: {path}: {str(exc).removeprefix('config.json: ')}")


def check_checkpoint(parser: argparse.ArgumentParser, argument: str, folder: Path):
    """checkpoint_config, and the safetensors files' headers against it (model.weights.check_files: a truncated or
    garbled file, a missing tensor, a wrong shape); returns the config. Reads no tensor data."""
    from model.weights import CheckpointError, check_files

    cfg = checkpoint_config(parser, argument, folder)
    try:
        check_files(folder, cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        parser.error(f"{argument}: {exc}")
    return cfg


def devices_here() -> list[str]:
    """The --device values that run here: "cpu", and with GPUs "cuda", "cuda:0", ..."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if count else [])


def check_device(parser: argparse.ArgumentParser, argument: str, device: str | None) -> str | None:
    """device ("cpu", "cuda", "cuda:N"; None passes) as given; refused when it is no device or not here."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    here = devices_here()
    if parsed is None or parsed.type not in DEVICES:
        parser.error(f"{argument}: unknown device {device!r}; valid: {', '.join(DEVICES)}, cuda:N; "
                     f"here: {', '.join(here)}")
    if parsed.type == "cuda" and ("cuda" not in here or (parsed.index is not None and device not in here)):
        problem = "no CUDA GPU on this machine" if "cuda" not in here else "no such GPU here"
        parser.error(f"{argument} {device}: {problem}; valid here: {', '.join(here)}")
    return device


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def runnable(op: str, device: str, dtype=None) -> list[str]:
    """Backends of op (a registry op) that run on `device` tensors here and take `dtype` (a torch dtype) when
    given."""
    from kernellab import registry

    table = registry.registered(op)
    return [name for name in registry.backends(op, device) if dtype is None or dtype in table[name].dtypes]


def _why_not(op: str, name: str, device: str, dtype=None) -> str | None:
    """Why backend `name` of op cannot run on `device` tensors of `dtype` here; None when it can."""
    import torch

    from kernellab import registry

    table = registry.registered(op)
    kind = torch.device(device).type
    if name not in table:
        return f"{op} has no backend {name!r}"
    backend = table[name]
    if reason := backend.unavailable_reason():
        return reason
    if kind not in backend.devices():
        return f"backend {name!r} of {op} runs on {', '.join(backend.devices())} tensors here, not {kind}"
    if dtype is not None and dtype not in backend.dtypes:
        return (f"backend {name!r} of {op} takes {', '.join(map(_dtype_name, backend.dtypes))}, "
                f"not {_dtype_name(dtype)}")
    return None


def backend_problem(op: str, name: str, device: str, dtype=None) -> str | None:
    """Why backend `name` of op (a registry op) cannot run on `device` tensors of `dtype` (a torch dtype, or
    None for any) here, with the backends registered and those that run there; None when it can run."""
    import torch

    from kernellab import registry

    if (why := _why_not(op, name, device, dtype)) is None:
        return None
    where = torch.device(device).type + (f" {_dtype_name(dtype)}" if dtype is not None else "")
    return (f"{why} (registered: {', '.join(registry.registered(op))}; run here on {where}: "
            f"{', '.join(runnable(op, device, dtype)) or 'none'})")


def check_backend(parser: argparse.ArgumentParser, argument: str, op: str, name: str, device: str, dtype=None):
    """Refuse `argument` unless backend `name` of op runs on `device` tensors of `dtype` here."""
    if problem := backend_problem(op, name, device, dtype):
        parser.error(f"{argument}: {problem}")


def _model_why_not(name: str, device: str, dtype, peers: bool) -> str | None:
    from kernellab import registry
    from model.model import OPS

    ops = [op for op in OPS if name in registry.registered(op)]
    if not ops:
        return f"{name!r} is a backend of none of the model's ops ({', '.join(OPS)})"
    if not peers and any(registry.registered(op)[name].peer for op in ops):
        return f"{name!r} is a peer's code, not a lab backend"
    return next(filter(None, (_why_not(op, name, device, dtype) for op in ops)), None)


def model_backends(device: str, dtype=None, peers: bool = True) -> list[str]:
    """The backend names the Qwen3.5 model runs with on `device` tensors (of `dtype`) here: each one the
    backend of one of its ops at least, and running on every op it is registered for (the others take
    "auto"); peers' names only when `peers`."""
    from kernellab import registry
    from model.model import OPS

    names = dict.fromkeys(name for op in OPS for name in registry.registered(op))
    return [name for name in names if _model_why_not(name, device, dtype, peers) is None]


def model_backend_problem(name: str, device: str, dtype=None, peers: bool = True) -> str | None:
    """Why the model cannot run with backend `name` on `device` tensors of `dtype` here, with the names it runs
    with (None when it can): model.from_pretrained gives `name` to every op registered under it."""
    if (why := _model_why_not(name, device, dtype, peers)) is None:
        return None
    return f"{why}; the model runs here with: {', '.join(model_backends(device, dtype, peers)) or 'none'}"
