"""Weights on disk: safetensors read and written by hand, our checkpoint format, the hub's layout,
and the download of OpenAI's released files.

Loading never unpickles anything, and it checks before it trusts: every offset in a safetensors
header is bounds-checked, and a config's sizes are checked against the header's shapes before a
model is built or allocated. A problem is a CheckpointError naming the file and the key or tensor.
"""

import hashlib
import json
import math
import mmap
import os
import stat
import struct
from pathlib import Path
from urllib.parse import urlsplit

import requests
import torch
from tqdm import tqdm

from common import JSON_ERRORS, json_problem, replace_atomically, write_json_atomic
from tokenizer import TEMPLATES, jinja_template


class CheckpointError(ValueError):
    """A weights file or checkpoint that cannot be loaded; the message names the file and tensor."""


# ----------------------------------------------------------------------------- safetensors, by hand
# 8 bytes of little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
# [begin, end]}, "__metadata__": {str: str}}, then the raw tensor bytes (offsets count from there).

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap: a real header is kilobytes


# What a file handed to us in place of safetensors is, by its first bytes. Each would read as an
# absurd header length, so they are told apart only once the length fails its checks.
OTHER_FORMATS = ((b"GGUF", "a GGUF file (llama.cpp's format)"),
                 (b"PK\x03\x04", "a zip archive, as torch.save writes (pytorch_model.bin, .pt)"),
                 (b"\x80", "a pickle, as an older torch.save wrote (pytorch_model.bin, .pt)"))


def read_safetensors_header(path):
    """Parse and bounds-check a safetensors header. Returns (header dict, offset of the data)."""
    path = Path(path)
    check_regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            refuse_other_format(path, head)
        if n > MAX_HEADER_BYTES:  # refused before reading it: parsing a 10 GB "header" would exhaust memory
            raise CheckpointError(f"{path}: header length {n:,} bytes is over the {MAX_HEADER_BYTES:,} a "
                                  "safetensors header may have")
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        header = parse_json(f.read(n), path, "header is not valid JSON")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans = sorted(_tensor_span(path, name, info, data_len) for name, info in header.items() if name != "__metadata__")
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return header, data_start


def check_regular_file(path):
    """A CheckpointError unless `path` is a regular file: opening a FIFO named model.safetensors
    would wait forever for a writer, and a device would read without end."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else \
            "socket" if stat.S_ISSOCK(mode) else "device"
        raise CheckpointError(f"{path}: a {kind}, not a regular file")


def refuse_other_format(path, head):
    """A CheckpointError saying what `path` is, if its first bytes `head` are another format's."""
    for magic, what in OTHER_FORMATS:
        if head.startswith(magic):
            raise CheckpointError(f"{path}: {what}, not a safetensors file; load the safetensors weights "
                                  "it was made from" + (" (pickles are never loaded: they can run code)"
                                                        if "torch.save" in what else ""))


def parse_json(blob, path, what):
    """json.loads(blob), or a CheckpointError `path`: `what` (why), whichever way the parser refuses."""
    try:
        return json.loads(blob)
    except JSON_ERRORS as e:
        raise CheckpointError(f"{path}: {what} ({json_problem(e)})") from None


def read_json_file(path, what):
    """The JSON in the regular file `path`, or a CheckpointError `path`: `what` (why)."""
    check_regular_file(path)
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: {what} ({e.strerror or e})") from None
    return parse_json(blob, path, what)


def _tensor_span(path, name, info, data_len):
    """(begin, end, name) of one header entry, once its dtype, shape and offsets make sense and its
    bytes lie inside the file's `data_len` data bytes."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
            or not all(isinstance(o, int) for o in (begin, end)):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or offsets")
    if any(v >= 2 ** 64 for v in (*shape, begin, end)):  # (the format's integers are 64-bit)
        raise CheckpointError(f"{path}: tensor {name!r} has a size or offset of 2**64 or more")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{path}: tensor {name!r} offsets [{begin}, {end}] lie outside the "
                              f"{data_len} data bytes (truncated file?)")
    if end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but "
                              f"{dtype}{shape} needs {nbytes}")
    return begin, end, name


def iter_safetensors(path):
    """Yield (name, tensor) from a safetensors file. Tensors are views of a copy-on-write memory map,
    so the file's pages are read lazily and never held twice; copy what you keep."""
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin) if count else \
            torch.empty(0, dtype=dtype)
        yield name, t.view(info["shape"])


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors (tensors in name order, header padded to 8 bytes)."""
    header, offset, items = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        items.append(t)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in items:
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().tobytes())


def all_finite(t):
    """Whether tensor `t` holds no NaN or inf. A sum is NaN or inf when any element is, and costs a
    fraction of isfinite's pass (no bool tensor the size of the weights); only a sum that overflowed
    from finite values (huge weights, or float16's small range) needs the exact check."""
    return math.isfinite(t.sum()) or bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------- our checkpoint format
# A directory: model.safetensors (nn.Linear's [out, in] weights, marked {"layout": LAYOUT} in its
# metadata) and config.json ({"format": LAYOUT, "config": every GPTConfig field but dropout,
# metadata...}: the chat template, a training run's flags). Weights without the marker are the
# hub's: OpenAI's layout, whose Conv1D weights gpt.py transposes on the way in.

FAMILY = "gpt2-chatbot/"  # our layouts' prefix: a later version's files are refused, never misread


LAYOUT = FAMILY + "v1"  # marks our own files: nn.Linear [out, in] weights, no transpose needed


def write_checkpoint(directory, state, config, metadata):
    """Write our checkpoint: the tensors `state` and the GPTConfig fields `config` (a dict, dropout
    left out: a training choice), each file atomically, so an interrupted save never leaves a
    half-written checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    replace_atomically(directory / "model.safetensors",
                       lambda tmp: write_safetensors(tmp, state, metadata={"layout": LAYOUT}))
    write_json_atomic(directory / "config.json", {"format": LAYOUT, "config": config, **metadata})


def read_checkpoint_json(directory, config_fields=None):
    """Our config.json: {"format": LAYOUT, "config": {every GPTConfig field but dropout}, metadata...}.
    With `config_fields` (GPTConfig's field names), the config must have every one of them but
    dropout, and no other: a default filled in for a missing size would describe another model."""
    path = Path(directory) / "config.json"
    info = read_json_file(path, "not a valid checkpoint config")
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint config (not a JSON object)")
    if info.get("format") != LAYOUT:
        found = f"format {info['format']!r} is unknown" if "format" in info else "no \"format\" key"
        raise CheckpointError(f"{path}: {found}; this version reads {LAYOUT!r} checkpoints")
    config = info.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint config (no \"config\" object)")
    if config_fields is None:
        return info
    known = list(config_fields)
    unknown = [k for k in config if k not in known]
    if unknown:
        raise CheckpointError(f"{path}: unknown config key {unknown[0]!r} (GPTConfig has {', '.join(known)})")
    missing = [k for k in known if k not in config and k != "dropout"]  # (dropout is a training choice)
    if missing:
        raise CheckpointError(f"{path}: the config has no {', '.join(missing)}")
    return info


def is_our_layout(path, header):
    """Whether `path` holds our layout (nn.Linear weights, a GPTConfig in config.json beside it), as
    its metadata says, rather than the hub's. Refused: a later version of our layout, and weights
    beside our config.json that lost the marker (re-saved by another tool): whether they are [out, in]
    or transposed is then unknown, and square matrices would load either way, wrong."""
    layout = (header.get("__metadata__") or {}).get("layout")
    if layout == LAYOUT:
        return True
    if layout is not None and layout.startswith(FAMILY):
        raise CheckpointError(f"{path}: layout {layout!r} is not one this version reads ({LAYOUT!r})")
    try:
        fmt = read_json_file(path.parent / "config.json", "not valid JSON").get("format")
    except (CheckpointError, AttributeError):
        fmt = None  # no config.json, or not ours: hub_config reads it or says what is wrong
    if isinstance(fmt, str) and fmt.startswith(FAMILY):
        raise CheckpointError(f"{path}: no \"layout\" in its __metadata__ (re-saved by another tool?), though "
                              f"config.json beside it is a {fmt} checkpoint's; our weights need "
                              f"{{\"layout\": \"{LAYOUT}\"}} there")
    return False


def read_model_config(path, header, name, released, config_fields):
    """What the weights at `path` are, before anything is built: (the GPTConfig fields but dropout,
    as a dict; our config.json's contents, or for hub weights their template (hub_template); the
    file to name in a config error; whether they are in the hub's Conv1D layout). Ours come from
    our config.json; hub weights from a released name's sizes in `released`, else from hub_config."""
    config_json = path.parent / "config.json"
    where = config_json if config_json.exists() else path
    if is_our_layout(path, header):
        info = read_checkpoint_json(path.parent, config_fields)
        return {k: v for k, v in info["config"].items() if k != "dropout"}, info, where, False
    return released.get(str(name)) or hub_config(path, header, released), hub_template(path), where, True


def hub_template(path):
    """{"template": NAME} when the tokenizer_config.json beside hub weights carries one of our chat
    templates, word for word (our HF export writes it: a model fine-tuned in a template keeps it on
    the way back); {} otherwise (none, another tool's, or an unreadable file: the weights still load)."""
    config = Path(path).parent / "tokenizer_config.json"
    try:
        jinja = read_json_file(config, "not valid JSON").get("chat_template") if config.exists() else None
    except (CheckpointError, AttributeError):
        return {}
    return next(({"template": name} for name in TEMPLATES if jinja == jinja_template(name)), {})


def check_config(config, header, where, path):
    """A CheckpointError naming `where` (the config's file) unless the config describes a model that
    can be built, of the sizes of the weights in `path`. A config.json edited by hand (or written by
    something else) fails here in one line, not deep in nn.Module construction or an allocation of
    terabytes."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{where}: {name} must be a positive integer, not {value!r}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{where}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    if not isinstance(config.bias, bool):
        raise CheckpointError(f"{where}: bias must be true or false, not {config.bias!r}")
    _check_config_fits_weights(config, header, where, path)


def _check_config_fits_weights(config, header, where, path):
    """The vocabulary, width, context and layer count must be those of the weights, read from the
    header alone: these are the sizes that decide how much the model allocates; the shape of every
    other tensor follows from them and is checked as it is loaded."""
    shapes = _shapes(header)
    for key, sizes in (("wte.weight", ("vocab_size", "n_embd")), ("wpe.weight", ("block_size", "n_embd"))):
        for size, dim in zip(sizes, _embedding_shape(shapes, key, path)):
            if getattr(config, size) != dim:
                raise CheckpointError(f"{where}: {size} {getattr(config, size)} disagrees with the weights: "
                                      f"{path.name} holds {key!r} of shape {shapes[key]}")
    layers = {k.split(".")[1] for k in shapes if k.startswith("h.")}
    if config.n_layer != len(layers):
        raise CheckpointError(f"{where}: n_layer {config.n_layer} disagrees with the weights: "
                              f"{path.name} holds {len(layers)} layer{'s' if len(layers) != 1 else ''}")


def _shapes(header):
    """{tensor name without the hub's `transformer.` prefix: shape} of a safetensors header."""
    return {k.removeprefix("transformer."): v["shape"] for k, v in header.items() if k != "__metadata__"}


def _embedding_shape(shapes, key, path):
    """The shape of embedding `key` (wte.weight or wpe.weight), which must be there and 2-D."""
    if key not in shapes:
        raise CheckpointError(f"{path}: missing tensor {key!r}")
    if len(shapes[key]) != 2:
        raise CheckpointError(f"{path}: tensor {key!r} has shape {shapes[key]}, expected 2 dimensions")
    return shapes[key]


# ----------------------------------------------------------------------------- the hub's layout

def hub_config(path, header, released):
    """The GPTConfig fields (a dict) of a hub-layout file: from its HF config.json when there is one,
    else from the tensor shapes (the head count, which shapes do not show, from the widths of the
    `released` sizes: {name: {n_layer, n_head, n_embd}})."""
    hf = Path(path).parent / "config.json"
    if hf.exists():
        c = read_json_file(hf, "not valid JSON")
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if not isinstance(c, dict) or k not in c]
        if missing:
            raise CheckpointError(f"{hf}: not a GPT-2 config: it has no {', '.join(missing)}")
        return dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                    block_size=c.get("n_positions", c.get("n_ctx", 1024)), vocab_size=c["vocab_size"])
    shapes = _shapes(header)
    vocab, n_embd = _embedding_shape(shapes, "wte.weight", path)
    block_size, _ = _embedding_shape(shapes, "wpe.weight", path)
    layers = [k.split(".")[1] for k in shapes if k.startswith("h.")]
    bad = next((k for k in layers if not k.isdigit()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor names 'h.{bad}...' do not number their layer")
    n_layer = len(set(layers))  # (not 1 + the highest number: a stray 'h.9999999.' would build 10**7 layers)
    heads = {s["n_embd"]: s["n_head"] for s in released.values()}
    if n_embd not in heads:
        raise CheckpointError(f"{path}: width {n_embd} is not a released GPT-2 size; put a config.json with n_head beside it")
    return dict(n_layer=n_layer, n_head=heads[n_embd], n_embd=n_embd, block_size=block_size, vocab_size=vocab)


HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"


def cache_dir():
    """Where downloads live: $GPT2_CACHE_DIR, else ~/.cache/gpt2-chatbot."""
    return Path(os.environ.get("GPT2_CACHE_DIR") or Path.home() / ".cache" / "gpt2-chatbot")


def resolve_weights(name_or_path, released=()):
    """A name in `released` (downloaded into the cache once), a checkpoint directory, or a
    .safetensors file -> the path of the .safetensors file to load."""
    name = str(name_or_path)
    if name in released and not Path(name).exists():
        return download(HUB_URL.format(name=name), cache_dir() / name / "model.safetensors",
                        offline=f"give a checkpoint directory or .safetensors file in place of {name!r}")
    p = Path(name)
    if p.is_dir():
        p = p / "model.safetensors"
        if not p.exists():
            # a train.py run directory keeps its model one level down, in checkpoint/
            inside = sorted(str(q.parent) for q in Path(name).glob("*/model.safetensors"))
            more = ", ..." if len(inside) > 3 else ""
            hint = f" (models inside it: {', '.join(inside[:3])}{more})" if inside else ""
            raise CheckpointError(f"{name_or_path}: directory has no model.safetensors{hint}")
        return p
    if not p.exists():
        raise CheckpointError(f"{name}: no such file or directory, and not one of {', '.join(released)}")
    return p


# ----------------------------------------------------------------------------- download

class DownloadError(OSError):
    """A download that did not complete: no network, no answer, an HTTP error, a cut, a bad checksum.
    Its message names the URL and why; callers add what to do offline (which flag takes a local file)."""


def download(url, dest, sha256=None, chunk_size=1 << 16, timeout=30, offline=None):
    """Download `url` to `dest` unless it is already there, with a progress bar.

    The bytes go to `dest.part` and are renamed to `dest` only when complete and verified; if a
    `.part` is left over from an interrupted run, the download resumes from its end with an HTTP
    Range request. The size is checked against the server's (a connection cut where the size is
    unknown is caught too), and the SHA-256 against `sha256` or, failing that, the hub's
    `X-Linked-Etag` (the LFS object's SHA-256). A mismatch deletes the file. A failure is a
    DownloadError saying why; `offline` (what the user can give instead) adds what to do without
    a network: "offline, copy that file to DEST, or OFFLINE"."""
    try:
        return _download(url, Path(dest), sha256, chunk_size, timeout)
    except DownloadError as e:
        if offline is None:
            raise
        raise DownloadError(f"{e}; offline, copy that file to {dest}, or {offline}") from None


def _download(url, dest, sha256, chunk_size, timeout):
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        fetched = _fetch_part(url, part, chunk_size, timeout)
    except requests.exceptions.RequestException as e:
        raise DownloadError(f"cannot download {url} ({network_problem(e, url, timeout)})") from None
    if fetched is None:  # our .part is already whole (or bogus): start again
        part.unlink()
        return _download(url, dest, sha256, chunk_size, timeout)
    total, hub_sha256, encoded, cut = fetched
    size = part.stat().st_size
    if cut or (total is not None and size != total):
        if encoded:
            part.unlink()
        of = f" of {total}" if total is not None else ""
        again = "run again to resume" if not encoded else "run again to start over"
        raise DownloadError(f"download of {url} stopped at {size}{of} bytes; {again}")
    expected = sha256 or hub_sha256
    if expected:
        _check_sha256(part, url, expected)
    os.replace(part, dest)
    return dest


def network_problem(e, url, timeout):
    """A few words on why requests could not get `url` (`e`: one of its exceptions), instead of
    urllib3's paragraph."""
    if isinstance(e, requests.exceptions.HTTPError):
        return f"the server answered {e.response.status_code} {e.response.reason}"
    if isinstance(e, requests.exceptions.Timeout):  # (before ConnectionError: a ConnectTimeout is both)
        return f"no answer from {urlsplit(url).hostname} within {timeout} s"
    if isinstance(e, requests.exceptions.ConnectionError):
        return f"cannot reach {urlsplit(url).hostname}: no network, or the server is down"
    return f"{type(e).__name__}: {e}"


def _fetch_part(url, part, chunk_size, timeout):
    """Append what the server sends of `url` to the file `part`, asking for the bytes past its end.
    Returns (the full size or None where unknown, the hub's SHA-256 or None, whether the server
    compressed the bytes, whether the connection was cut), or None when the server says there are
    no bytes past the end (416)."""

    have = part.stat().st_size if part.exists() else 0
    # identity: sizes and Range offsets are then those of the file itself (requests would otherwise ask
    # for gzip, and Content-Length would count the compressed bytes while we write decompressed ones)
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    cut = False
    with requests.get(url, stream=True, headers=headers, timeout=timeout) as r:
        if r.status_code == 416:
            return None
        r.raise_for_status()
        encoded = r.headers.get("Content-Encoding", "identity").lower() != "identity"
        if r.status_code != 206 or encoded:  # the server ignored the Range header (or compressed anyway,
            have = 0                          # so offsets mean nothing): start from zero
        total = _full_size(r, have, encoded)
        etag = (r.headers.get("X-Linked-Etag") or "").strip('"')
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                          desc=part.name.removesuffix(".part"), disable=None) as bar:
            try:
                for chunk in r.iter_content(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
            except requests.exceptions.RequestException:
                cut = True  # a cut connection: what arrived is kept in .part (resumable unless compressed)
    return total, etag if len(etag) == 64 else None, encoded, cut


def _full_size(response, have, encoded):
    """The size of the whole file by the server's headers, or None where they cannot tell."""
    if encoded:  # (what arrives is decompressed: the server's sizes don't apply)
        return None
    try:
        if response.status_code == 206 and "Content-Range" in response.headers:
            return int(response.headers["Content-Range"].rsplit("/", 1)[1])
        return have + int(response.headers.get("Content-Length", 0)) or None
    except ValueError:
        raise DownloadError(f"cannot download {response.url}: the server sent a size that is not a number") from None


def _check_sha256(path, url, expected):
    """Delete the file at `path` and raise unless its SHA-256 is `expected`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        path.unlink()
        raise DownloadError(f"checksum mismatch for {url}: got sha256 {h.hexdigest()}, expected {expected}; "
                      f"the bad file was deleted")
