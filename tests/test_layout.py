"""The project's layout is part of what it teaches: libraries apart from scripts, imports one way."""
import ast

from conftest import ROOT

LIBRARIES = {"common", "checkpoint", "gpt", "tokenizer", "data", "sampling", "inference", "kernels", "runner",
             "engine", "openai_api", "training", "lora", "scoring"}
SCRIPTS = {"train", "sft", "generate", "serve", "synth", "export", "eval"}


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
