"""The project's layout is part of what it teaches: libraries apart from scripts, imports one way."""
import ast
import importlib.metadata
import sys

import pytest

from conftest import ROOT

LIBRARIES = {"common", "checkpoint", "gpt", "tokenizer", "data", "conversations", "sampling", "inference", "paged_attention", "runner",
             "scheduler", "engine", "openai_api", "training", "lora", "scoring", "preference"}
SCRIPTS = {"train", "sft", "dpo", "generate", "serve", "synth", "export", "eval"}


def project_imports(path, modules):
    """The project modules that the file at `path` imports, anywhere in it (a lazy import inside a
    function is an import all the same)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def test_every_top_level_file_is_a_library_a_script_or_a_benchmark():
    assert not LIBRARIES & SCRIPTS, "a file is a library or a script, not both"
    names = {p.stem for p in ROOT.glob("*.py")}
    unknown = names - LIBRARIES - SCRIPTS - {n for n in names if n.startswith("bench_")}
    assert not unknown, f"say whether {sorted(unknown)} is a library or a script (tests/test_layout.py)"


def test_no_top_level_file_shadows_an_installed_package_or_the_standard_library():
    """The repository's folder comes first on sys.path, so a file named like a package hides it from
    every library that imports it (transformers imports Hugging Face's `kernels` when installed: a
    kernels.py here broke transformers)."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    clashes = sorted(p.name for p in ROOT.glob("*.py") if p.stem in installed)
    assert not clashes, f"rename {clashes}: an installed package or the standard library has that name"


def test_libraries_never_import_scripts_and_scripts_never_import_each_other():
    modules = {p.stem for p in ROOT.glob("*.py")}
    scripts = SCRIPTS | {n for n in modules if n.startswith("bench_")}
    wrong = []
    for path in sorted(ROOT.glob("*.py")):
        imported = project_imports(path, modules) - {path.stem}
        if path.stem.startswith("bench_"):  # a benchmark may import what it measures, never another benchmark
            bad = {m for m in imported if m.startswith("bench_")}
        else:
            bad = imported & scripts
        wrong += [f"{path.name} imports {m}.py" for m in sorted(bad)]
    assert not wrong, "; ".join(wrong)


def test_the_library_imports_have_no_cycle():
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {m: project_imports(ROOT / f"{m}.py", modules) - {m} for m in LIBRARIES}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))
    cycles = [m for m in LIBRARIES if reaches(m, m)]
    assert not cycles, f"import cycle through {sorted(cycles)}"


@pytest.mark.parametrize("network", ["refused", "mute"])
def test_a_clone_without_the_tokenizer_files_and_offline_stops_at_once_saying_what_is_missing(tmp_path, network):
    """No ../shared beside the clone and no way to download (connections refused, or a network that
    takes them and never answers): the whole run stops before collecting a test, saying in one line
    what is missing and how to get it (not hundreds of failures, nor a hang)."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", clone / "tests")
    shutil.copy(ROOT / "pytest.ini", clone)
    (clone / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    # offline: every download through a proxy that is not there, or one that never answers; and
    # tiktoken's default cache (in the temporary directory) empty
    mute = socket.create_server(("127.0.0.1", 0))  # (listens, and never reads or answers)
    proxy = f"http://127.0.0.1:{mute.getsockname()[1] if network == 'mute' else 9}"
    env.update(HTTPS_PROXY=proxy, https_proxy=proxy, TMPDIR=str(tmp_path), TIKTOKEN_DOWNLOAD_TIMEOUT="3")
    with mute:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stdout + r.stderr
    said = [line for line in (r.stdout + r.stderr).splitlines() if "tokenizer files are missing" in line]
    assert said and "TIKTOKEN_CACHE_DIR" in said[0] and str(tmp_path / "shared" / "tiktoken_cache") in said[0]
    assert ("TimeoutError" in said[0]) == (network == "mute")
    assert "passed" not in r.stdout and "Traceback" not in r.stdout + r.stderr
