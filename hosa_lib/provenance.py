"""What a result was computed from: digests of the library's source and of the notebooks.

A stage marker, an ablation cell's cached result, a checkpoint and an embedding cache each record the
code that made them, as make/DVC stages record their inputs, so an edit (committed or not) reruns
what it affects and nothing is shown as new that older code computed.

- `running_code()`: the `hosa_lib` modules this process has loaded and the digest of their source as
  it was when the package was first imported (`SNAPSHOT`, taken then): the code that actually ran. A
  stage that never loaded `scoring` (data preparation reusing its store) does not depend on it.
- `current_code(modules)`: the digest of the same modules' files now. A result is up to date when the
  two agree; an edit made while a long run was going on therefore reruns it too.
- `closure(modules)`: modules and every `hosa_lib` module they import, transitively (lazy imports
  included, as `tests/test_architecture.py` reads them): for keys that several processes share (the
  embedding cache) and for results whose module list was not recorded.
- A notebook counts by its cells' sources (not outputs or metadata, which running or saving rewrites).

`HOSA_KEEP_STALE=1` (the pipeline's `--keep-stale`) is the explicit opt-out: results computed by other
code are then reused and marked "computed by other code" in reports and the index (data changes
always rerun).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent
KEEP_STALE_ENV = "HOSA_KEEP_STALE"
STALE_NOTE = "computed by other code"


def fingerprint(path: Path) -> str:
    """What changes when a file is rewritten (the project's writers always replace files by rename)."""
    path = Path(path)
    st = path.stat() if path.exists() else None
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}" if st else f"{path.name}:missing"


def keep_stale() -> bool:
    """The opt-out: reuse results computed by other code (marked in reports) instead of recomputing."""
    return os.environ.get(KEEP_STALE_ENV, "") not in ("", "0", "false", "no")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PKG.rglob("*.py"))}


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SNAPSHOT: dict[str, str] = {m: _hash(p.read_bytes())[:16] for m, p in _modules().items()}  # at package import


def loaded_modules() -> list[str]:
    """The hosa_lib modules this process has imported, sorted."""
    known = _modules()
    return sorted(m for m in list(sys.modules) if m in known)


def running_code(modules=None) -> dict:
    """{"digest", "modules": {module: source hash}}: the code this process runs (default: every hosa_lib
    module it has loaded), each module's source as it was when the package was first imported."""
    mods = {m: SNAPSHOT.get(m, "new") for m in sorted(modules if modules is not None else loaded_modules())}
    return {"digest": _hash(json.dumps(mods, sort_keys=True).encode())[:16], "modules": mods}


def current_code(modules) -> dict[str, str]:
    """{module: hash of its source file now} ('missing' for a module deleted since)."""
    known = _modules()
    return {m: _hash(known[m].read_bytes())[:16] if m in known else "missing" for m in sorted(modules)}


def changed_modules(record: dict | None) -> list[str]:
    """The modules of a `running_code()` record whose source changed since (all of them for no record)."""
    mods = (record or {}).get("modules") or {}
    if not isinstance(mods, dict) or not mods:
        return ["(no record)"]
    now = current_code(mods)
    return [m.removeprefix("hosa_lib.") for m, h in mods.items() if now[m] != h]


def is_current(record: dict | None) -> bool:
    """A `running_code()` record whose modules all still have the source they ran with."""
    return not changed_modules(record)


def import_targets(tree: ast.AST, name: str, is_pkg: bool) -> list[str]:
    """Every dotted name the module `name` imports (at any depth in the file, lazy imports included),
    relative imports resolved, with `from m import a` giving both `m` and `m.a`. The architecture test
    reads the import graph through this too."""
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def _imports_of(tree: ast.AST, name: str, is_pkg: bool, mods) -> set[str]:
    return {t for t in import_targets(tree, name, is_pkg) if t in mods}


def closure(modules) -> list[str]:
    """The given hosa_lib modules (`hosa_lib.train` or `train`) and every module they import, transitively,
    with the `__init__` of each package on the way; sorted."""
    mods = _modules()
    todo = [m if m.startswith("hosa_lib") else f"hosa_lib.{m}" for m in modules]
    unknown = [m for m in todo if m not in mods]
    if unknown:
        raise KeyError(f"not a hosa_lib module: {unknown[0]}")
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in mods]
        path = mods[m]
        todo += _imports_of(ast.parse(path.read_bytes()), m, path.name == "__init__.py", mods)
    return sorted(seen)


@functools.cache
def static_code(modules: tuple[str, ...]) -> str:
    """Digest of `closure(modules)` as this process imported it (SNAPSHOT): a key that every process
    running the same code computes alike (the embedding cache's)."""
    return running_code(closure(modules))["digest"]


def notebook_sources(path: Path) -> list[str]:
    """The code and markdown cells' sources of a notebook: what running it does (outputs left out)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return ["".join(c.get("source", "")) for c in nb.get("cells", []) if c.get("cell_type") in ("code", "markdown")]


def notebook_digest(path: Path) -> str:
    return _hash("\0".join(notebook_sources(path)).encode())[:16]


def notebook_modules(path: Path) -> set[str]:
    """The hosa_lib modules a notebook's code cells import (`from hosa_lib import a, b`, `import hosa_lib.c`)."""
    mods, out = _modules(), set()
    for src in notebook_sources(path):
        try:
            tree = ast.parse("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        out |= _imports_of(tree, "hosa_lib", True, mods)
    return out - {"hosa_lib"}
