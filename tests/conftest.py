"""Shared test set-up: offline tokenizer files, the fixtures folder, and small models."""
import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# the fixtures live beside the checkout; a copy inside it (git-ignored) is what travels to a GPU machine
SHARED = next((d for d in (ROOT.parent / "shared", ROOT / "shared") if d.is_dir()), ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))

# GPT-2's BPE files ship in ../shared for offline machines; elsewhere tiktoken downloads them as usual.
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))



def pytest_sessionstart(session):
    """Every test needs GPT-2's tokenizer files; all other data the tests make themselves (made_data.py).
    Without the files (no ../shared beside the clone, no internet to download them) the run stops at
    once, in one line, rather than failing test by test."""
    import threading

    import tiktoken
    failure = ["TimeoutError"]  # (tiktoken downloads with no timeout: a network that drops packets would hang)

    def load():
        try:
            tiktoken.get_encoding("gpt2")
            failure.clear()
        except Exception as e:  # (requests' ConnectionError offline, ProxyError, ...)
            failure[0] = type(e).__name__
    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout=float(os.environ.get("TIKTOKEN_DOWNLOAD_TIMEOUT", 120)))
    if failure:
        pytest.exit(f"GPT-2's tokenizer files are missing: no {SHARED / 'tiktoken_cache'} and tiktoken cannot "
                    f"download them ({failure[0]}); connect to the internet once, or set TIKTOKEN_CACHE_DIR "
                    f"to a folder that holds them", returncode=4)


# A suite started in the background of a non-interactive shell (`pytest &`) inherits SIGINT ignored, and
# so would every script the tests start, which the tests stop with Ctrl-C as a user would: take it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# One thread, here and in the scripts the tests start: the models are tiny, and a second thread mostly
# spins waiting for the first (CPU time the suite's budget counts); the few large parity checks lose
# seconds of wall time, not of CPU time.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@contextlib.contextmanager
def single_thread():
    """Models this small gain nothing from intra-op threads, and where the few cores are busy, threads
    that wait for each other make a step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` into any file fail with EFBIG, "File too large" (Python ignores the
    SIGXFSZ that would otherwise kill it): a full disk, as far as a writer can tell, for this
    process only, undone afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def one_line_error(capsys):
    """What a script printed on stderr, checked to be one line starting with "error: "."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def context_sensitive(model, scale=5.0):
    """Scale a random model's matrices up, in place, and return it. At GPT-2's 0.02 init a random
    model's greedy text is one token repeated, whatever came before, so a KV cache that lost old
    keys would reproduce it just as well; scaled, the next token depends on the context."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def refused_before_any_work(main, argv, out, message, capsys):
    """A script's main(argv) with a bad flag: exit 2, a one-line error containing `message`, and no
    output directory `out` (nothing was started). Patch the script's data loading to fail first."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)])
    assert e.value.code == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def made_data(tmp_path_factory):
    """A folder of the datasets the tests make themselves (made_data.py): stories.txt,
    instructions.json (Alpaca's layout), oasst_trees.jsonl (OpenAssistant's trees)."""
    import made_data
    return made_data.write_all(tmp_path_factory.mktemp("made_data"))


@pytest.fixture
def tiny_model():
    """A 2-layer, 4-head GPT-2 with the real vocabulary, random weights, fp32."""
    from gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()


def saying_always(token, block_size=128):
    """A tiny model whose every greedy token is `token`: ln_f outputs a constant vector b, and the (tied)
    embedding of `token` points along b, so its logit dwarfs every other."""
    from gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size)).eval()
    with torch.no_grad():
        b = torch.randn(32)
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(b)
        model.wte.weight[token] = 10 * b
    return model
