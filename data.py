"""Pretraining data: plain text on disk into the token stream a GPT-2 pretrains on.

The stream is stored as uint16 token files and read back with np.memmap (below, why). Conversations,
the data of fine-tuning, are conversations.py's.

    python data.py tinystories-small      # or shakespeare, a text file, a URL: data_cache/<name>/
"""

import argparse
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import DownloadError, download
from common import check_flags, die, replace_atomically, write_json_atomic
from tokenizer import EOT, encode, get_tokenizer

# ----------------------------------------------------------------------------- the token files
# Pretraining reads one long stream of tokens: every document's tokens, each document preceded by
# <|endoftext|>, so the model learns where a text begins and that what came before is unrelated.
# The stream is stored as raw uint16 (GPT-2's 50257 ids fit in 16 bits) in train.bin and val.bin,
# read back with np.memmap: a 10 GB corpus costs no RAM, and any batch is one slice away.
#
# Documents. Inside a text file, a line that is "<|endoftext|>" (spaces around it ignored) separates
# documents (the format TinyStories ships in). A file without such lines is ONE document (a book, a
# play): its blank lines separate paragraphs, not texts. Each document is stripped of surrounding
# whitespace.
#
# Splits. TinyStories has its own validation file; any other source keeps the last `val_fraction`
# of its tokens for validation.
#
# Command line (an argparse subcommand, with a short form; at the end of this file):
#   python data.py pretrain tinystories [--out DIR]    # or shakespeare, tinystories-small, a file, a URL
#   python data.py tinystories                         # short for the same
# Output goes to data_cache/<name>/ beside this file: train.bin, val.bin and meta.json. meta.json is
# written last and records the source files and the split, so a finished preparation is skipped when
# run again with the same files (and redone when a file changed, or when --val-fraction is given and
# differs from the split there; train.py keeps whatever split was prepared).

TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"
PRETRAIN_DATASETS = {  # name -> (train text URL, validation text URL or None to split the train text)
    "tinystories": (TINYSTORIES_URL.format("train"), TINYSTORIES_URL.format("valid")),  # 2.2 GB, ~0.5B tokens
    "tinystories-small": (TINYSTORIES_URL.format("valid"), None),  # its 22 MB validation file alone: a quick start
    "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", None),
}
DATA_CACHE = Path(__file__).resolve().parent / "data_cache"
DOC_SEPARATOR = "<|endoftext|>"


def read_text_batches(path, batch_chars=1 << 20):
    """Stream a text file as batches (lists) of (text, starts_document) pieces, ~batch_chars each.

    A long document is cut into pieces only just before a newline that follows a non-space
    character: GPT-2's pre-tokenizer never joins a non-space to the whitespace after it, so the
    pieces tokenize to exactly the tokens of the whole document (a cut after the newline would
    not: "a\\n" + "\\nb" encodes differently from "a\\n\\nb")."""
    batch, batch_len = [], 0
    doc, doc_len, new_doc = [], 0, True  # lines of the current document not yet in a batch
    with open(path, encoding="utf-8") as f:
        for line in itertools.chain(f, [DOC_SEPARATOR]):  # a final separator closes the last document
            if line.strip() == DOC_SEPARATOR:
                text = "".join(doc).rstrip()
                if text:
                    batch.append((text, new_doc))
                    batch_len += len(text)
                doc, doc_len, new_doc = [], 0, True
            else:
                if new_doc and not doc:
                    line = line.lstrip()  # a document starts at its first non-space character
                    if not line:
                        continue
                doc.append(line)
                doc_len += len(line)
                if doc_len >= batch_chars and line.endswith("\n") and len(line) > 1 and not line[-2].isspace():
                    batch.append(("".join(doc)[:-1], new_doc))  # cut just before this line's newline
                    batch_len += doc_len - 1
                    doc, doc_len, new_doc = ["\n"], 1, False
            if batch_len >= batch_chars:
                yield batch
                batch, batch_len = [], 0
    if batch:
        yield batch


_worker_enc = None


def _ignore_sigint():
    """Pool initializer. Ctrl-C in a terminal signals every process of the foreground group; only the
    main process should act on it (stop the pool, remove its partial file, exit), not print one
    KeyboardInterrupt traceback per worker as well."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_batch(batch):
    """Worker: one batch of pieces -> (uint16 tokens, EOT before every document's first piece;
    characters read, for the progress bar)."""
    global _worker_enc
    _worker_enc = _worker_enc or get_tokenizer()
    ids = []
    for text, starts_document in batch:
        if starts_document:
            ids.append(EOT)
        ids += encode(text, _worker_enc)
    return np.array(ids, dtype=np.uint16), sum(len(text) for text, _ in batch)


def tokenize_file(src, dest, workers=None, batch_chars=1 << 20, desc=None):
    """Tokenize the text file `src` into the uint16 token file `dest` (written atomically:
    common.replace_atomically), in parallel worker processes. Returns the number of tokens."""
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise ValueError(f"{src}: " + ("not a regular file" if src.exists() else "no such file"))
    size = src.stat().st_size
    if size == 0:
        raise ValueError(f"{src}: the file is empty")
    workers = workers or min(os.cpu_count() or 1, 16)
    workers = max(1, min(workers, size // batch_chars))  # small files: no worker processes at all
    n = 0

    def write(tmp):
        nonlocal n
        n = _tokenize_into(tmp, src, size, workers, batch_chars, desc or src.name)
        if n == 0:
            raise ValueError(f"{src}: no text in the file (only whitespace and separators)")
    try:
        replace_atomically(dest, write)
    except UnicodeDecodeError as e:
        raise ValueError(f"{src}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    return n


def _tokenize_into(path, src, size, workers, batch_chars, desc):
    """Write the tokens of text file `src` (`size` bytes) into `path`, encoded by `workers`
    processes in batches of about `batch_chars`. Returns the number of tokens."""
    n = 0
    with open(path, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        stop = threading.Event()  # once set, no further batch is read from the file
        batches = itertools.takewhile(lambda _: not stop.is_set(), read_text_batches(src, batch_chars))
        pool = multiprocessing.Pool(workers, initializer=_ignore_sigint) if workers > 1 else None
        try:
            # imap keeps the order of the batches, so the token stream follows the file
            results = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
            for ids, chars in results:
                out.write(ids.tobytes())
                n += len(ids)
                bar.update(min(chars, bar.total - bar.n))  # characters ~ bytes (exact for ASCII)
        finally:
            if pool:
                # Not pool.terminate(): it hangs for good when it catches the pool's feeding thread
                # between taking a batch and sending it (Ctrl-C can), as a batch is more than the
                # pipe to the workers holds and terminate has already stopped its readers.
                # Instead: the feeding stops, the batches already sent finish (a second or so;
                # the workers ignore Ctrl-C), and the workers exit.
                stop.set()
                pool.close()
                pool.join()
        bar.update(bar.total - bar.n)
    return n


def _split_tail(train_path, val_path, val_fraction):
    """Move the last val_fraction of the tokens in train_path into val_path (for single-file sources)."""
    tokens = np.memmap(train_path, dtype=np.uint16, mode="r")
    n_val = int(len(tokens) * val_fraction)
    if n_val < 2 or len(tokens) - n_val < 2:
        raise ValueError(f"{len(tokens)} tokens are too few to split into train and validation parts")
    keep = len(tokens) - n_val
    replace_atomically(val_path, tokens[keep:].tofile)  # a full disk, Ctrl-C: no partial file left behind
    del tokens  # close the map before truncating the file under it
    os.truncate(train_path, keep * np.dtype(np.uint16).itemsize)


def resolve_pretrain_source(source):
    """A dataset name, a URL or a local text file -> (name, [train text path or URL, val or None])."""
    source = str(source)
    if source in PRETRAIN_DATASETS:
        return source, list(PRETRAIN_DATASETS[source])
    if source.startswith(("http://", "https://")):
        return Path(source.split("?")[0].rstrip("/")).stem or "download", [source, None]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source}: no such file, and not a URL or one of {', '.join(PRETRAIN_DATASETS)}")
    if not path.is_file():
        raise ValueError(f"{source}: not a regular file (a text file, or a directory holding train.bin and val.bin)")
    return path.stem, [str(path.resolve()), None]


DEFAULT_VAL_FRACTION = 0.1


def prepare_pretrain_data(source, out_dir=None, val_fraction=None, workers=None):
    """Download (when a name or URL) and tokenize a pretraining source into out_dir (default
    data_cache/<name>/): train.bin, val.bin, meta.json. Skipped when meta.json says it is done from
    the same files and, if `val_fraction` is given, with that split (None: any split already there,
    DEFAULT_VAL_FRACTION for a new one)."""
    name, (train_src, val_src) = resolve_pretrain_source(source)
    out = Path(out_dir) if out_dir else DATA_CACHE / name
    if out.exists() and not out.is_dir():  # (mkdir would say "File exists")
        raise ValueError(f"{out} is a file, not a directory for the token files")
    out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = (_local_text(src, out) for src in (train_src, val_src))
    stamp = {"source": str(source), "files": [
        {"path": t, "bytes": os.path.getsize(t), "mtime": os.path.getmtime(t)} for t in (train_text, val_text) if t]}
    meta_path = out / "meta.json"
    # (a --val-fraction asked for and not the one there must not silently keep the old split)
    if _prepared(out, stamp, val_fraction if not val_text else None):
        return out  # done before, from the same files
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    meta_path.unlink(missing_ok=True)
    n_train = tokenize_file(train_text, out / "train.bin", workers, desc=f"{name} train")
    if val_text:
        n_val = tokenize_file(val_text, out / "val.bin", workers, desc=f"{name} val")
    else:
        _split_tail(out / "train.bin", out / "val.bin", val_fraction)
        n_train, n_val = n_train - int(n_train * val_fraction), int(n_train * val_fraction)
    write_json_atomic(meta_path, {"tokenizer": "gpt2", "dtype": "uint16", "eot": EOT, "train_tokens": n_train,
                                  "val_tokens": n_val, "val_fraction": None if val_text else val_fraction,
                                  "stamp": stamp})
    return out


def _local_text(src, out):
    """The path of text source `src` on this machine: a URL is downloaded into `out` once."""
    if src is None or not src.startswith(("http://", "https://")):
        return src
    try:
        return str(download(src, out / Path(src.split("?")[0]).name, offline="give a text file on this machine instead"))
    except OSError as e:  # a DownloadError, a full disk: one line, not a traceback
        try:
            out.rmdir()  # (only if empty: a failed first download leaves no empty folder behind)
        except OSError:
            pass
        raise ValueError(str(e) if isinstance(e, DownloadError) else f"cannot save {src} into {out} ({e.strerror or e})") from None


def _prepared(out, stamp, val_fraction):
    """Whether `out` holds both token files and a meta.json made from the files in `stamp`, split at
    `val_fraction` (None: at whatever split it was)."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except FileNotFoundError:
        return False
    except ValueError:
        meta = {}
    same_split = val_fraction is None or meta.get("val_fraction") == val_fraction
    return meta.get("stamp") == stamp and same_split and all((out / f"{s}.bin").exists() for s in ("train", "val"))


def load_tokens(directory, split):
    """The token stream of a prepared split ("train" or "val") as a read-only np.memmap of uint16."""
    path = Path(directory) / f"{split}.bin"
    if not path.is_file() or path.stat().st_size < 4:
        raise ValueError(f"{path}: missing or empty; prepare it with: python data.py pretrain <source> --out {directory}")
    if path.stat().st_size % 2:  # (np.memmap's own error names no file)
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, an odd number, so not uint16 tokens (a cut or "
                         f"foreign file?); prepare it again with: python data.py pretrain <source> --out {directory}")
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(tokens, position, batch_size, seq_len):
    """Inputs x and targets y (x shifted by one), both (batch_size, seq_len) int64, from the
    batch_size * seq_len + 1 tokens starting at `position`: consecutive rows of one slice."""
    n = batch_size * seq_len
    if position + n + 1 > len(tokens):
        raise ValueError(f"a batch at position {position} needs {n + 1} tokens; the stream has {len(tokens)}")
    buf = torch.from_numpy(tokens[position:position + n + 1].astype(np.int64))
    return buf[:-1].view(batch_size, seq_len), buf[1:].view(batch_size, seq_len)


# ----------------------------------------------------------------------------- command line

def _add_pretrain_command(subparsers):
    p = subparsers.add_parser("pretrain", help="tokenize text into train.bin / val.bin for train.py",
                              description="Download and tokenize a pretraining source into uint16 token files.")
    p.add_argument("source", help=f"{' | '.join(PRETRAIN_DATASETS)} | a text file | an http(s) URL")
    p.add_argument("--out", default=None, help="output directory (default: data_cache/<name>/)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of the tokens kept for validation when the source has no validation file "
                        f"(default: {DEFAULT_VAL_FRACTION}, or the split already prepared there)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: one per CPU core, at most 16, fewer for small files)")
    p.set_defaults(run=_run_pretrain_command)


def _run_pretrain_command(args):
    check_flags(args, val_fraction=(lambda v: 0 < v < 1, "between 0 and 1"))
    try:
        out = prepare_pretrain_data(args.source, args.out, args.val_fraction, args.workers)
    except (ValueError, OSError) as e:
        die(str(e))
    meta = json.loads((out / "meta.json").read_text())
    print(f"{out}: {meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} validation tokens")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="`python data.py SOURCE` is short for `python data.py pretrain SOURCE`.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain_command(subparsers)
    if argv and not argv[0].startswith("-") and argv[0] not in subparsers.choices:
        argv = ["pretrain"] + argv  # the short form
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("name a command (or a pretraining source)")
    args.run(args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: quit without a traceback (tokenize_file removes its partial file)
        sys.exit(130)
