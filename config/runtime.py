"""What every stage script shares at run time: settings (overrides, rules, --help), distributed setup, safe file writes
and reads, image decoding, stop signals and the metrics log.

Settings. A script keeps its settings as module-level constants, each with a comment `RULE; what it is`, and calls
`config = configure(globals())` after them. Then, nanoGPT-style:

    python train_dit.py config/dit_xl_800ep.py --lr=1e-4 --global_batch_size 512

Arguments without `--` are Python files executed in order; `--key=value` or `--key value` set one constant; `--help`
prints every setting with its default, rule and comment. Values are Python literals of the default's type (a string
setting also takes a bare word). The rule, written first in the comment, is what the value must satisfy:
    > 0   >= 1   [0, 1)   (0, inf)   a number (finite) compared or in an interval
    stop | skip   True | False | None   one of these values (words are strings)
    path   text   ints   None | ints   any string / a tuple of ints, alone or beside listed values
Unknown keys, wrong types and broken rules stop the script with one `error:` line naming the key and what it takes.
"""
import ast
import contextlib
import datetime
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import tokenize

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw


def fail(message):
    raise SystemExit(f"error: {message}")


def explain(error):
    """An exception as one short line for an error message: its type and its text, white space folded."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


# ----------------------------------------------------------------------------------------------------------------------
# settings

def read_settings(script):
    """{name: (default source text, rule, comment)} of the script's settings block, and its section headings by name.

    The block is the run of top-level lowercase constant assignments before the first function, class or call."""
    source = open(script).read()
    comments = {token.start[0]: token.string[1:].strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    settings, headings, heading, last_line = {}, {}, None, 0
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or (
                isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            break
        above = [comments[n] for n in range(last_line + 1, node.lineno) if n in comments]
        last_line = node.end_lineno
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.islower()):
            continue
        heading = above[-1] if above else heading
        comment = next((comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments), "")
        rule, _, text = comment.partition("; ")
        default = ast.get_source_segment(source, node.value)  # as written (2e-4), unless it spans lines
        default = repr(ast.literal_eval(node.value)) if "\n" in default else default
        settings[node.targets[0].id] = (default, rule.strip(), text.strip())
        headings[node.targets[0].id] = heading
    return settings, headings


def rule_error(value, rule):
    """None if value satisfies rule (see the module docstring), else what it must be."""
    interval = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", rule)
    comparison = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", rule)
    if interval or comparison:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"a finite number {rule}"
        if comparison:
            bound = float(comparison[2])
            ok = {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[comparison[1]]
            return None if ok else rule
        low, high = float(interval[2]), float(interval[3])
        ok = (low <= value if interval[1] == "[" else low < value) and (value <= high if interval[4] == "]" else
                                                                        value < high)
        return None if ok else f"in {rule}"
    for option in (o.strip() for o in rule.split("|")):
        if option in ("path", "text") and isinstance(value, str):
            return None
        if option == "ints" and isinstance(value, tuple) and all(type(v) is int for v in value):
            return None
        try:
            literal = ast.literal_eval(option)
        except (ValueError, SyntaxError):
            literal = option
        if type(literal) is type(value) and literal == value:
            return None
    return "one of " + ", ".join(o.strip() for o in rule.split("|"))


def print_help(namespace, settings, headings):
    script = os.path.basename(namespace["__file__"])
    print((namespace.get("__doc__") or "").strip() + "\n")
    print(f"Settings of {script}: --key=value (or --key value), or Python config files with plain assignments.\n"
          "Each line: the setting with its default, the rule a value must satisfy, what it is.")
    heading = None
    for name, (default, rule, text) in settings.items():
        if headings[name] != heading and headings[name]:
            heading = headings[name]
            print(f"\n# {heading}")
        option = f"--{name}={default}"
        print(f"  {option:<38} {rule:<20} {text}" if len(option) < 39 else f"  {option}\n  {'':<38} {rule:<20} {text}")


def parse_value(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if not isinstance(default, str) and default is not None:
            fail(f"--{key}={text!r} is not a valid {type(default).__name__}")
        value = text  # bare words for string options: --model_name=LightningDiT-B/1, --compile=flase (refused later)
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # a string setting takes the text as typed: --out_dir=2024 is the folder "2024"
    return check_type(key, value, default)


def check_type(key, value, default):
    value = tuple(value) if isinstance(value, list) else value  # settings hold immutable literals
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    fail(f"--{key} expects {type(default).__name__} (default {default!r}), got {value!r}")


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to a script's globals, check every rule; return the config dict."""
    settings, headings = read_settings(namespace["__file__"])
    keys = list(settings)
    unruled = [k for k, (_, rule, _) in settings.items() if not rule]
    if unruled:  # a developer's slip, caught on the first run: every setting states what it accepts
        raise RuntimeError(f"settings without a rule in their comment: {', '.join(unruled)}")
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print_help(namespace, settings, headings)
        raise SystemExit(0)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"config file {arg} does not exist (options are written --key=value; --help lists them)")
            overrides = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), {}, overrides)
            for key, value in overrides.items():
                if key.startswith("_") or isinstance(value, type(sys)):
                    continue
                if key not in keys:
                    fail(f"{arg} sets unknown key {key!r}; known keys: {', '.join(keys)}")
                namespace[key] = check_type(key, value, namespace[key])
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if not args or args[0].startswith("--"):
                fail(f"--{key} needs a value (--{key}=VALUE)")
            text = args.pop(0)
        if key not in keys:
            fail(f"unknown option --{key}; --help lists the options")
        namespace[key] = parse_value(key, text, namespace[key])
    for key, (_, rule, _) in settings.items():
        problem = rule_error(namespace[key], rule)
        if problem:
            fail(f"--{key}={namespace[key]!r} is not allowed: it must be {problem}")
    return {k: namespace[k] for k in keys}


def check_resume(saved, config, path, free):
    """Resuming continues the saved run exactly only if every setting that shapes its arithmetic is unchanged."""
    changed = [f"{k} {saved[k]!r} -> {config[k]!r}" for k in config if k in saved and k not in free
               and saved[k] != config[k]]
    if changed:
        fail(f"{path} was trained with other settings ({'; '.join(changed)}); a resume must continue the same run. "
             "Rerun with the old values, or start a new run in another out_dir (--init_from=that checkpoint "
             "to start from its weights)")


# ----------------------------------------------------------------------------------------------------------------------
# processes

def setup_distributed(timeout_minutes=10):
    """Start torch.distributed when launched by torchrun (RANK set): NCCL on CUDA, gloo on CPU. A collective that waits
    longer than timeout_minutes (a stuck or lost rank) ends the process with one error line.

    Returns (rank, world_size, device). On CUDA, matmuls and convolutions use TF32, as the release runs them."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one key-value store across --max-restarts attempts and does not separate their keys, so a
        # restarted rank can read a dead peer's address and fail to connect: give each attempt its own prefix
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                    is_master=False)
        store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent_store)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device,
                                timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)

    def report_timeout(kind, error, traceback):
        if "timed out" in str(error).lower():  # gloo's and NCCL's words for a collective past its timeout
            print(f"error: rank {rank} waited more than {timeout_minutes:g} min for the other ranks ({explain(error)})"
                  ". Another rank is stuck or gone; rerun, and under torchrun "
                  "--max-restarts the job resumes from its last checkpoint by itself", file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, error, traceback)
    sys.excepthook = report_timeout
    return rank, world_size, device


def batch_schedule(num_items, what, global_batch_size, micro_batch_size, world_size, epochs, max_steps):
    """How a training run splits its work: (per-process batch, micro-batch, micro-batches per step, steps per epoch,
    the last step)."""
    if global_batch_size % world_size:
        fail(f"global_batch_size {global_batch_size} is not divisible by the {world_size} processes")
    per_rank = global_batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        fail(f"micro_batch_size {micro} does not divide the per-process batch {per_rank}")
    steps_per_epoch = num_items // global_batch_size
    if steps_per_epoch == 0:
        fail(f"{num_items} {what} are fewer than one global batch of {global_batch_size}")
    if max_steps > epochs * steps_per_epoch:
        fail(f"--max_steps={max_steps} is past the end of --epochs={epochs} ({epochs * steps_per_epoch} steps of "
             f"{global_batch_size}); raise --epochs or lower --max_steps")
    return per_rank, micro, per_rank // micro, steps_per_epoch, max_steps or epochs * steps_per_epoch


def compile_and_autocast(device, compile, bf16):
    """(whether to torch.compile, the autocast context) from settings where None means "on CUDA only"."""
    use_bf16 = device.type == "cuda" if bf16 is None else bf16
    return (device.type == "cuda" if compile is None else compile), (
        torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext())


_stop_signal = None
_stop_announced = False


def catch_stop_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption) no longer kill the process: should_stop() reports them."""
    global _stop_signal, _stop_announced
    main_pid, _stop_signal, _stop_announced = os.getpid(), None, False

    def request_stop(number, frame):
        global _stop_signal
        if os.getpid() == main_pid and _stop_signal is None:  # data-loader workers inherit this handler: quiet there
            print(f"{signal.Signals(number).name}: stopping with a checkpoint at the next step", flush=True)
        _stop_signal = _stop_signal or signal.Signals(number).name
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, request_stop)


def should_stop(step):
    """Called by every rank after each step: True, on every rank at the same step, once any rank was signalled.

    A signalled rank names step + 1 in the process group's key-value store (first one wins); no rank can pass that
    step before reading it, because every step ends in a gradient all-reduce. No device sync, one store lookup."""
    global _stop_announced
    if not dist.is_initialized():
        return _stop_signal is not None
    store = dist.distributed_c10d._get_default_store()
    if _stop_signal is not None and not _stop_announced:
        store.compare_set("stop_at_step", "", str(step + 1))
        _stop_announced = True
    return store.check(["stop_at_step"]) and step >= int(store.get("stop_at_step"))


# ----------------------------------------------------------------------------------------------------------------------
# files: every write goes through write_atomically

TEMP_NAME = re.compile(r"^\..+\.tmp\d+$")


def write_atomically(path, write):
    """write(f) into a temporary file beside path, fsync, rename over path. On any failure (a full disk, a read-only
    or missing folder, whichever library raised it) the temporary file is removed, an earlier file at path is left as it
    was, and the script stops with one error line."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # torch's zip writer raises RuntimeError on ENOSPC, safetensors its own type
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, Exception):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:200]
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there"
        fail(f"could not write {path} ({reason}). Free disk space or choose a writable folder; files written before "
             "are intact")


def prepare_out_dir(folder, setting="out_dir"):
    """Create folder, prove it writable now (not hours later), and remove temporary files of earlier crashed saves."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"{setting} {folder} is a file, not a folder; choose another --{setting}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"could not create {setting} {folder}: {e.strerror}; choose another --{setting}")
    write_atomically(os.path.join(folder, ".write_test"), lambda f: f.write(b"ok"))
    os.remove(os.path.join(folder, ".write_test"))
    stale = [name for name in os.listdir(folder) if TEMP_NAME.match(name)]
    for name in stale:
        os.remove(os.path.join(folder, name))
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an earlier interrupted save from {folder}")


def save_checkpoint(state, path):
    write_atomically(path, lambda f: torch.save(state, f))


def checkpoint_name(step):
    return f"step_{step:08d}.pt"


def latest_checkpoint(folder):
    """The checkpoint with the highest step in folder (by the step in its name, never by size or time): ours
    (step_XXXXXXXX.pt) or the release's (NNNNNNN.pt, also in folder/checkpoints/)."""
    if not os.path.isdir(folder):
        return None
    for where in (folder, os.path.join(folder, "checkpoints")):
        steps = {int(m[1]): n for n in (os.listdir(where) if os.path.isdir(where) else [])
                 if (m := re.fullmatch(r"(?:step_)?(\d+)\.pt", n))}
        if steps:
            return os.path.join(where, steps[max(steps)])
    return None


def load_checkpoint(path, allow_unsafe=False, need=(), hint=""):
    """torch.load with weights_only=True; arbitrary unpickling only when the user asks for it. A folder stands for its
    newest checkpoint. need: keys the file must hold (a dict), else one error line ending in hint."""
    if os.path.isdir(path):
        if not latest_checkpoint(path):
            fail(f"folder {path} holds no checkpoint (step_XXXXXXXX.pt, or the release's NNNNNNN.pt)")
        path = latest_checkpoint(path)
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_unsafe)
    except Exception as e:  # noqa: BLE001 -- torch raises several types for bad files
        if "Unsupported global" in str(e):
            fail(f"{path} holds pickled Python objects beyond tensors (e.g. a PyTorch Lightning checkpoint) and was "
                 "not loaded. Only if you trust its source, rerun with --allow_unsafe_checkpoint=True")
        fail(f"{path} is not a readable checkpoint ({explain(e)}); "
             "it may be truncated or corrupt")
    missing = [k for k in need if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}{hint}")
    return checkpoint


def safetensors_layout(path):
    """{name: (dtype name, shape, first byte, end byte)} of the tensors of a safetensors file (8 bytes of header length,
    then a JSON header), without reading them. A broken header or a file that ends before its data (a copy cut short)
    raises ValueError; a malformed entry KeyError or TypeError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if not 2 <= header_size < size:
            raise ValueError("no safetensors header")
        header = json.loads(f.read(header_size))
    start = 8 + header_size
    layout = {name: (entry["dtype"], tuple(entry["shape"]), start + entry["data_offsets"][0],
                     start + entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"}
    if max((end for *_, end in layout.values()), default=start) > size:
        raise ValueError("the file is shorter than its header says: truncated")
    return layout


def load_latent_stats(path):
    """(mean, std), each (1,C,1,1) float32, from a latents_stats.pt written by prepare.py (or the release's)."""
    stats = load_checkpoint(path, need=("mean", "std"), hint=" (expected a latent statistics file as prepare.py "
                                                             "writes it: {'mean', 'std'}, each (1, C, 1, 1))")
    if not all(isinstance(stats[k], torch.Tensor) for k in ("mean", "std")):
        fail(f"{path}: 'mean' and 'std' must be tensors")
    mean, std = (stats[k].float().reshape(1, -1, 1, 1) for k in ("mean", "std"))
    if mean.shape != std.shape or not bool((std > 0).all()) or not bool(mean.isfinite().all() & std.isfinite().all()):
        fail(f"{path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} must have one finite entry per latent "
             "channel and std must be positive; rerun prepare.py to rewrite it")
    return mean, std


# ----------------------------------------------------------------------------------------------------------------------
# images: one reader for every stage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list


def walk_once(root):
    """(folder, file names) for each folder under root: symlinked folders are followed, but each real folder is read
    once, so a link loop ends."""
    seen = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        if os.path.realpath(folder) in seen:
            subfolders.clear()
            continue
        seen.add(os.path.realpath(folder))
        subfolders.sort()  # the same path to a linked folder on every run
        yield folder, names


def list_images(root):
    """Image files under root in sorted order (walk_once)."""
    return sorted(os.path.join(folder, n) for folder, names in walk_once(root) for n in names
                  if n.lower().endswith(IMAGE_EXTENSIONS))


def load_rgb(path):
    """Decode an image file to 8-bit RGB as torchvision's loader does (no EXIF rotation); raise on unreadable or
    truncated files. Two cases where that loader gives garbage are fixed (ImageNet's JPEGs have neither):
    16-bit images are rescaled instead of clipped at 255, and transparent pixels are composited over white."""
    with Image.open(path) as image:
        image.load()  # decode now so that a truncated file fails here, not later
        if image.mode.startswith("I"):  # 16/32-bit greyscale
            gray = np.asarray(image, dtype=np.float64) / 257.0
            return Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8)).convert("RGB")
        if image.has_transparency_data:  # RGBA, LA, P with a transparent colour
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")  # L, P, CMYK, YCbCr, ... as torchvision's loader does


def adm_center_crop(image, size):
    """ADM's center crop (guided-diffusion): the release's for every image it encodes, and FID's reference recipe."""
    while min(image.size) >= 2 * size:  # halve with a box filter first: cheap, alias-free downsampling
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def save_png(array, path):
    write_atomically(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------------------
# the metrics log of a training run

def format_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_printer(name, total):
    """A function to call with each batch's size: prints images done, images/s and time left, every 10 s."""
    start, last, done = time.time(), 0.0, 0

    def update(n):
        nonlocal last, done
        done, now = done + n, time.time()
        if now - last >= 10 or done == total:
            rate = done / max(now - start, 1e-9)
            print(f"{name}: {done}/{total} images, {rate:.1f} images/s, {format_duration((total - done) / rate)} left",
                  flush=True)
            last = now
    return update


class MetricsLog:
    """out_dir/metrics.jsonl (one JSON line per log step), its plot metrics.png, the ETA and the final summary.

    A run resumed at step S first drops the lines past S (logged after its last checkpoint), so no step repeats."""

    def __init__(self, out_dir, start_step, total_steps, master):
        self.path, self.master = os.path.join(out_dir, "metrics.jsonl"), master
        self.start_step, self.total_steps, self.start_time = start_step, total_steps, time.time()
        self.records = []
        if master and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError):  # a line cut short by a crash
                        record = json.loads(line)
                        if record.get("step", math.inf) <= start_step:
                            self.records.append(record)
            write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.records).encode()))

    def log(self, step, record):
        """Append {step, **record}; returns the ETA text for the log line."""
        record = {"step": step, **record}
        self.records.append(record)
        if self.master:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                fail(f"could not append to {self.path} ({e.strerror}). Free disk space; checkpoints are intact")
        done = step - self.start_step
        return format_duration((time.time() - self.start_time) / done * (self.total_steps - step)) if done else "?"

    def plot(self):
        """metrics.png: one panel per logged number against the step."""
        if not self.master or len(self.records) < 2:
            return
        keys = [k for k in self.records[-1] if k not in ("step", "epoch") and isinstance(self.records[-1][k], float)]
        width, height, margin = 640, 110, 44
        image = Image.new("RGB", (width, height * len(keys)), "white")
        draw = ImageDraw.Draw(image)
        steps = [r["step"] for r in self.records]
        for row, key in enumerate(keys):
            points = [(s, r[key]) for s, r in zip(steps, self.records) if math.isfinite(r.get(key) or math.nan)]
            if not points:
                continue
            low, high = min(v for _, v in points), max(v for _, v in points)
            top = row * height + 16

            def xy(s, v):
                return (margin + (width - margin - 8) * (s - steps[0]) / max(1, steps[-1] - steps[0]),
                        top + (height - 30) * (1 - (v - low) / ((high - low) or 1)))
            draw.rectangle((margin, top, width - 8, top + height - 30), outline="grey")
            draw.line([xy(s, v) for s, v in points], fill="navy", width=2)
            draw.text((margin, top - 14), f"{key}: last {points[-1][1]:.4g}, min {low:.4g}, max {high:.4g}",
                      fill="black")
            draw.text((2, top + height - 40), f"{steps[0]}", fill="grey")
        write_atomically(os.path.join(os.path.dirname(self.path), "metrics.png"),
                         lambda f: image.save(f, format="PNG"))

    def summary(self, step, images_per_step, key):
        """The run's closing line: why it ended, time, images seen, the last and best value of `key`, where it all is."""
        ended = "done" if step == self.total_steps else "stopped by a signal; rerun the same command to resume"
        text = (f"{ended}: step {step}/{self.total_steps}; {step - self.start_step} steps in "
                f"{format_duration(time.time() - self.start_time)}, {(step - self.start_step) * images_per_step:,} "
                "images seen")
        values = [(r[key], r["step"]) for r in self.records if isinstance(r.get(key), float)]
        if values:
            best = min(values)
            text += f"; {key} last {values[-1][0]:.4f}, best {best[0]:.4f} at step {best[1]}"
        return text + f"; checkpoints, metrics.jsonl and metrics.png in {os.path.dirname(self.path)}"
