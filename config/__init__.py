"""What every script shares: strict config overrides, distributed setup and safe checkpoint files.

A script keeps its settings as module-level constants and calls `config = configure(globals())`
right after them. Then, nanoGPT-style:

    python train_dit.py config/dit_xl_800ep.py --lr=1e-4 --global_batch_size 512

Arguments without `--` are Python files executed in order; `--key=value` or `--key value` set one
constant. Values are read as Python literals (a string default also takes a bare word). Unknown keys
and values of the wrong type stop the script with a message naming the key.
"""
import ast
import os
import sys

import torch


def _parse_value(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if not isinstance(default, str) and default is not None:
            raise SystemExit(f"error: --{key}={text!r} is not a valid {type(default).__name__}")
        value = text  # bare words for string options: --model=LightningDiT-B/1
    return _check_type(key, value, default)


def _check_type(key, value, default):
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    raise SystemExit(f"error: --{key} expects {type(default).__name__} (default {default!r}), got {value!r}")


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to a script's globals; return the config dict."""
    keys = [k for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]
    args = list(sys.argv[1:] if argv is None else argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file {arg} does not exist (options are written --key=value)")
            overrides = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), {}, overrides)
            for key, value in overrides.items():
                if key.startswith("_") or isinstance(value, type(sys)):
                    continue
                if key not in keys:
                    raise SystemExit(f"error: {arg} sets unknown key {key!r}; known keys: {', '.join(keys)}")
                namespace[key] = _check_type(key, value, namespace[key])
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if not args or args[0].startswith("--"):
                raise SystemExit(f"error: --{key} needs a value (--{key}=VALUE)")
            text = args.pop(0)
        if key not in keys:
            raise SystemExit(f"error: unknown option --{key}; known options: {', '.join(keys)}")
        namespace[key] = _parse_value(key, text, namespace[key])
    return {k: namespace[k] for k in keys}


def setup_distributed():
    """Start torch.distributed when launched by torchrun (RANK set): NCCL on CUDA, gloo on CPU.

    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one key-value store across --max-restarts attempts and does not separate their keys, so a
        # restarted rank can read a dead peer's address and fail to connect: give each attempt its own prefix
        agent_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                 world_size, is_master=False)
        store = torch.distributed.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent_store)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return rank, world_size, device


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash or a full disk mid-write leaves the previous file untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not write checkpoint {path}: {e.strerror or e}. "
                         "Free disk space or choose a writable out_dir; earlier checkpoints are intact.") from e


def load_checkpoint(path, allow_unsafe=False):
    """torch.load with weights_only=True; arbitrary unpickling only when the user asks for it.
    A folder stands for its newest step_*.pt checkpoint."""
    if os.path.isdir(path):
        if not latest_checkpoint(path):
            raise SystemExit(f"error: folder {path} holds no step_*.pt checkpoint")
        path = latest_checkpoint(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe)
    except Exception as e:  # noqa: BLE001 -- torch raises several types for bad files
        if "Unsupported global" in str(e):
            raise SystemExit(f"error: {path} holds pickled Python objects beyond tensors (e.g. a PyTorch Lightning "
                             "checkpoint) and was not loaded. Only if you trust its source, rerun with "
                             "--allow_unsafe_checkpoint=True.") from None
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                         "it may be truncated or corrupt") from None


def checkpoint_name(step):
    return f"step_{step:08d}.pt"


def latest_checkpoint(folder):
    """The checkpoint with the highest step in `folder` (by the step in its name, never by size or time)."""
    if not os.path.isdir(folder):
        return None
    steps = [int(n[5:-3]) for n in os.listdir(folder)
             if n.startswith("step_") and n.endswith(".pt") and n[5:-3].isdigit()]
    return os.path.join(folder, checkpoint_name(max(steps))) if steps else None
