"""The plumbing every script shares, once: one-line errors, flag checks, the device and dtype, an
atomic writer, a stop-on-signal helper and CUDA-graph capture. Nothing here knows about GPT-2."""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- errors and flags

def die(message):
    """Print a one-line error and exit: what the scripts do with bad input instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default == []
        return action.help if nothing else super()._get_help_string(action)


def flag(dest):
    """The command-line spelling of an argparse dest: max_new_tokens -> --max-new-tokens."""
    return "--" + dest.replace("_", "-")


def check_flags(args, **rules):
    """Die at the first flag whose value breaks its rule, given as name=(test, what it must be); a
    flag left unset (None) passes. Each test is a comparison that nan fails (every comparison with
    nan is False), so `--lr nan` is refused like `--lr -1`."""
    for name, (ok, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            die(f"{flag(name)} must be {must} (got {value})")


POSITIVE = (lambda v: 0 < v < math.inf, "a positive number")


NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "a number >= 0")


AT_LEAST_1 = (lambda v: v >= 1, "at least 1")


PROBABILITY = (lambda v: 0 <= v < 1, "at least 0 and below 1")


# ----------------------------------------------------------------------------- device and precision

def pick_device(requested=None):
    """--device if given, else cuda, then mps, then cpu."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_or_die(requested=None):
    """pick_device as a torch.device, for the scripts: a bad or unavailable --device is a one-line error."""
    try:
        device = torch.device(pick_device(requested))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # (torch knows more: xpu, meta, ...)
        die(f"bad --device {requested!r}: use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but no CUDA GPU is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        die("--device mps, but MPS is not available")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # the --dtype choices of the scripts that run a model


def dtype_or_die(device, name=None):
    """(the weights' torch dtype, whether their matrices run in int8) for a --dtype flag. "auto" is
    the fastest exact format this machine has (auto_dtype), said on stderr. int8 loads the weights
    in float32 and quantizes every matrix at load (inference.quantize_int8): PyTorch's int8 matrix
    kernels are CPU ones, so elsewhere it is a one-line error."""
    if name == "auto":
        name, why = auto_dtype(device)
        print(f"--dtype auto: {name} ({why})", file=sys.stderr)
    if name == "int8":
        if torch.device(device).type != "cpu":
            die(f"--dtype int8 runs on the CPU only, not on {device}: add --device cpu (or use bfloat16 on {device})")
        return torch.float32, True
    return default_dtype(device, name), False


def auto_dtype(device):
    """(dtype name, why) for --dtype auto. A decode step reads every weight once, so half the bytes
    is nearly twice the speed, but only where the chip multiplies bf16 itself: CUDA's tensor cores,
    and CPUs with AVX512-BF16 or AMX. A CPU without them converts every bf16 weight in software,
    slower than float32."""
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # (Ampere and later)
            return "bfloat16", "CUDA tensor cores"
        return "float32", "this GPU has no native bf16 arithmetic (before Ampere)"
    if kind == "cpu":
        native = [isa for isa, has in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
                  if getattr(torch.cpu, has, lambda: False)()]
        if native:
            return "bfloat16", f"this CPU has {' and '.join(native)}"
        return "float32", "this CPU has no native bf16 arithmetic"
    return "float32", f"bf16 on {kind} is not reliably faster"


def default_dtype(device, name=None):
    """The dtype `name`d (a --dtype flag: "bfloat16"), else the device's usual one: bfloat16 on CUDA
    (tensor cores, half the memory traffic), float32 elsewhere (CPUs without bf16 matrix units run
    it slower, and MPS's bf16 support is partial)."""
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast_for(device, dtype=None):
    """A function returning the context the forward passes run in: autocast to `dtype` (a torch
    dtype or its name; default: default_dtype(device)), or no autocast at all for float32. Under
    autocast the weights stay fp32 for the optimizer; only the matmuls run in the lower precision."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=dtype)


# ----------------------------------------------------------------------------- CUDA graphs

def capture_cuda_graph(forward, warmups=1, pool=None):
    """Record forward() as a CUDA graph: (graph, its output tensor). graph.replay() then reruns every
    kernel forward() launched, as one launch, reading its inputs from the same addresses and writing
    the same output tensor (copy new inputs into the tensors forward() reads; read the output before
    the next replay). CUDA requires warm-up runs on a side stream first (lazy initialisation, Triton
    compilation); `pool` shares one graph's memory pool with another."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output


# ----------------------------------------------------------------------------- files

def same_file(a, b):
    """Whether paths `a` and `b` name one file or directory: the same path once resolved (".."; links;
    relative to here), or, both existing, one file under two names (a hard link). What the scripts
    check before writing, so that an output never replaces the input it was made from."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def replace_atomically(path, write):
    """write(tmp) into `path`.tmp, then rename it to `path`: readers see the old file or the new one,
    never half of one. A write that fails (a full disk) deletes the .tmp and raises, `path` untouched."""
    replace_all_atomically({path: write})


def replace_all_atomically(files):
    """replace_atomically for several files {path: write(tmp)} that belong together (a model and its
    tokenizer): every .tmp is written before any is renamed into place, so a failed write leaves
    all the old files as they were."""
    tmps = {Path(path): Path(path).with_name(Path(path).name + ".tmp") for path in files}
    try:
        for path, write in files.items():
            write(tmps[Path(path)])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


@contextlib.contextmanager
def write_or_die(path, leftovers=()):
    """Around a write into `path`: an OSError (a full disk, a file too large, a directory deleted)
    becomes a one-line error naming `path`, after deleting `leftovers`, the failed write's temporary
    files. Checkpoints and JSON files are written to a temporary name first, so their previous
    version survives the failure intact."""
    try:
        yield
    except OSError as e:
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                Path(leftover).unlink()
        die(f"cannot write {path}: {e.strerror or e}")


# What json.loads raises for a text it cannot read: a JSONDecodeError, a UnicodeDecodeError (bytes),
# a plain ValueError for an integer past Python's digit limit (int() of a 5,000-digit number takes
# quadratic time, so Python refuses it), a RecursionError for "[[[[..." nested past its stack.
JSON_ERRORS = (ValueError, RecursionError)


def json_problem(e):
    """A few words on why json.loads refused a text with `e` (one of JSON_ERRORS), for a one-line error."""
    if isinstance(e, RecursionError):
        return "nested too deeply to read"
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg}: line {e.lineno} column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    if "digits" in str(e):
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return str(e)


def brief(value, width=200):
    """`value` as JSON in about `width` characters. Longer, it is cut at a clean boundary and ends in
    "…": an object or list after its last whole item, a string after a character."""
    text = json.dumps(value)
    if len(text) <= width:
        return text
    if isinstance(value, (dict, list)):
        items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()] if isinstance(value, dict) \
            else [json.dumps(v) for v in value]
        text = "{" if isinstance(value, dict) else "["
        for item in items:
            if len(text) + len(item) + 2 > width:
                break
            text += item + ", "
        return text + "…"
    if isinstance(value, str):  # the longest start whose JSON (escapes and all) fits
        n = width
        while len(json.dumps(value[:n])) > width:
            n -= 1
        return json.dumps(value[:n])[:-1] + "…"  # (without its closing quote: the string goes on)
    return text[:width] + "…"  # (a number of 200 digits)


# ----------------------------------------------------------------------------- stopping on a signal

class StopSignal:
    """Ctrl-C, or SIGTERM (what `docker stop`, systemd, `timeout` and Slurm send), as a request to
    stop at the next safe point instead of an exception wherever Python is:

        with StopSignal("saving after this step") as stop:
            for step in ...:
                ...
                if stop.requested:
                    save(); break

    The first signal sets `requested` and writes "interrupted: `message`" (nothing when `message` is
    None: a DDP process other than rank 0) through `write`, by default a print on a line of its own;
    a second signal raises KeyboardInterrupt, for a user who wants out now. The previous handlers
    are back on exit."""

    def __init__(self, message, signals=(signal.SIGINT, signal.SIGTERM), write=None):
        self.message, self.signals, self.requested = message, signals, False
        self.write = write or (lambda text: print("\n" + text, flush=True))  # (ends the line of a progress print)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            self.write(f"interrupted: {self.message}")

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
