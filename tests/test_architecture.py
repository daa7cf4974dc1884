"""The module graph of hosa_lib (docs/architecture.md): no import cycles, HDF5 only in the store,
no hidden global side effects on import or on model building."""
import ast
import sys
from pathlib import Path

import pytest

from hosa_lib.provenance import import_targets

PKG = Path(__file__).resolve().parent.parent / "hosa_lib"


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """module -> hosa_lib modules it imports (at any depth in the file), and module -> top-level packages."""
    mods = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}
    graph, external = {}, {}
    for name, path in mods.items():
        deps, ext = set(), set()
        for t in import_targets(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            ext.add(t.split(".")[0])
            if t in mods and t != name and mods[t].name != "__init__.py":
                deps.add(t)
        graph[name], external[name] = deps, ext
    return graph, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_hosa_lib():
    graph, _ = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_store_touches_hdf5():
    _, external = import_graph()
    assert "h5py" in external["hosa_lib.store"]
    users = sorted(m for m, ext in external.items() if "h5py" in ext and m != "hosa_lib.store")
    assert users == [], f"h5py imported outside hosa_lib.store: {users}"


def test_library_never_imports_papermill_or_argparse_at_module_level():
    """STYLE.md: hosa_lib takes explicit arguments; only the CLIs' main() and the pipeline driver parse/run notebooks."""
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top for a in n.names} | \
            {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"papermill", "argparse"}, path.name


def test_importing_viz_and_building_a_model_leave_global_state_alone(smoke_store):
    import matplotlib
    import torch

    style = dict(matplotlib.rcParams)
    import hosa_lib.viz  # noqa: F401
    assert dict(matplotlib.rcParams) == style
    from transformers.utils import logging as hf_logging

    from hosa_lib.config import DataConfig, RunConfig
    from hosa_lib.factory import build_model
    hf_on = hf_logging.is_progress_bar_enabled()
    cfg = RunConfig(data=DataConfig(store=smoke_store.store))
    states = []
    for seed in (123, 999):
        torch.manual_seed(seed)
        build_model(cfg, "cpu")
        states.append(torch.get_rng_state())
    assert hf_logging.is_progress_bar_enabled() == hf_on
    assert not torch.equal(*states)  # a build that reseeded the global RNG would leave both states equal


@pytest.mark.parametrize("key,reuses", [({"eval": {"protocol": "coco_5k"}}, True), ({"train": {"workers": 2}}, True),
                                        ({"train": {"device": "cpu"}}, True), ({"data": {"force": True}}, True),
                                        ({"train": {"threads": 1}}, True),
                                        ({"train": {"log_every": 3}}, True), ({"scoring": {"kernel": "torch"}}, True),
                                        ({"train": {"lr": 1e-3}}, False), ({"loss": {"kind": "infonce"}}, False),
                                        ({"model": {"anchor": True}}, False),
                                        ({"scoring": {"bands": 2}}, False), ({"train": {"seed": 1}}, False),
                                        ({"data": {"n_images": 99}}, False)])
def test_run_folder_key_covers_exactly_what_changes_weights(key, reuses):
    from hosa_lib.config import RunConfig, override
    from hosa_lib.runs import run_dir_for
    base = RunConfig()
    assert (run_dir_for(override(base, key)) == run_dir_for(base)) == reuses


def test_run_key_leaves_out_values_at_their_default():
    """A new option whose default keeps today's behaviour must not move existing runs to new folders:
    the key hashes only what differs from the defaults (an explicit default is the same run)."""
    from hosa_lib.config import RunConfig, override
    from hosa_lib.runs import weights_config, weights_key
    base = RunConfig()
    changed = override(base, {"train": {"lr": 1e-3}, "scoring": {"bands": 2}})
    assert weights_config(changed) == {"data": {}, "model": {}, "scoring": {"bands": 2}, "loss": {},
                                       "train": {"lr": 1e-3}}
    assert weights_key(override(changed, {"train": {"patience": 0, "validate_at_start": False}})) == weights_key(changed)


def test_run_key_is_the_same_with_a_symlinked_outputs_folder(tmp_path, monkeypatch):
    """outputs/ (or data/) symlinked to a bigger disk — or into another project — keeps the run key."""
    from hosa_lib.config import load
    from hosa_lib.runs import weights_key
    keys = []
    for name, link in (("plain", False), ("linked", True)):
        root = tmp_path / name
        (root / "params").mkdir(parents=True)
        (root / "params" / "base.yaml").write_text("name: x\n")
        if link:
            (tmp_path / "elsewhere" / "params").mkdir(parents=True)  # the target lies in another project
            (tmp_path / "elsewhere" / "params" / "base.yaml").write_text("name: y\n")
            (tmp_path / "elsewhere" / "outputs").mkdir()
            (root / "outputs").symlink_to(tmp_path / "elsewhere" / "outputs")
        else:
            (root / "outputs").mkdir()
        monkeypatch.chdir(root)
        keys.append(weights_key(load(root / "params" / "base.yaml")))
    assert keys[0] == keys[1]


DOC = PKG.parent / "docs" / "architecture.md"


def doc_table() -> list[tuple[int, set[str], set[str]]]:
    """(floor, modules, imports) of each row of docs/architecture.md's module table."""
    import re
    graph, _ = import_graph()

    def names(cell):
        out = set()
        for n in re.findall(r"`([^`]+)`", cell):
            out |= ({m for m in graph if m.startswith("hosa_lib.sources")} if n == "sources/*" else {f"hosa_lib.{n}"})
        return out
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((int(cells[0]), names(cells[1]), names(cells[3])))
    return rows


def test_architecture_doc_states_the_import_graph_and_its_floors():
    """docs/architecture.md is the import graph: one row per module, each row's imports exactly the
    modules it imports, and every import pointing to a lower floor (the layering rule it states)."""
    graph, _ = import_graph()
    rows = doc_table()
    listed = [m for _, mods, _ in rows for m in mods]
    assert sorted(listed) == sorted(m for m in graph if m != "hosa_lib"), "a module is missing or listed twice"
    floor = {m: f for f, mods, _ in rows for m in mods}
    row_of = {m: i for i, (_, mods, _) in enumerate(rows) for m in mods}  # `sources/*` is one row
    for f, mods, imports in rows:
        actual = set().union(*(graph[m] for m in mods)) - mods
        said = {row_of.get(m, m) for m in imports}
        assert {row_of[m] for m in actual} == said, \
            f"{sorted(mods)}: doc says {sorted(imports)}, code imports {sorted(actual)}"
        for m in mods:
            upward = [d for d in graph[m] if floor[d] >= f and d not in mods]
            assert not upward, f"{m} (floor {f}) imports {upward} on its floor or above"


def test_doc_table_parser_sees_a_wrong_row(tmp_path, monkeypatch):
    """The doc check can fail: a row claiming an import the code does not have is caught."""
    bad = DOC.read_text().replace("| 1 | `loss` |", "| 1 | `loss` | x | `store` |\n| 9 | `lossy` |", 1)
    fake = tmp_path / "architecture.md"
    fake.write_text(bad)
    monkeypatch.setattr(sys.modules[__name__], "DOC", fake)
    with pytest.raises(AssertionError):
        test_architecture_doc_states_the_import_graph_and_its_floors()


def test_only_the_store_reaches_into_hdf5_files():
    """Sources and caches write through StoreWriter / SidecarWriter methods, never their `.f`."""
    import re
    offenders = [f"{p.relative_to(PKG)}:{i}" for p in PKG.rglob("*.py") if p.name != "store.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b\w+\.f(\.|\[)", line)]
    assert not offenders, offenders
