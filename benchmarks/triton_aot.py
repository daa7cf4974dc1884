"""`make triton-aot`: compile the fused Triton kernels ahead of time for sm_80 (A100) and sm_90 (H100)
with the installed Triton, no GPU needed, and print what each launch setting costs.

    python benchmarks/triton_aot.py [--lengths 16 32 64 128] [--json out.json]

For every anchor length L (its launch row in `hosa_lib.fused_triton.LAUNCH`), kernel (forward,
backward, flash: the forward computing the band shares from the band features; flash_bwd_anchor and
flash_bwd_query: the flash backward's two passes, at the widest band PP it takes at that length,
`FLASH_BWD_LAUNCH`), input dtype (float32, bfloat16 under autocast) and target: shared memory per block
(Triton's metadata), registers per thread and stack bytes per thread (register spills; read from
the cubin with the `cuobjdump` that Triton ships). Exits 1 when a setting exceeds the target's
shared memory per block or 255 registers, so `make triton-aot` fails before a GPU run would.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# shared memory per block that a kernel may opt into (CUDA programming guide, compute capabilities)
TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
DTYPES = {"float32": "*fp32", "bfloat16": "*bf16"}


def _signature(kernel: str, ptr: str) -> dict:
    common = {"rho_ptr": ptr, "gram_ptr": ptr, "amask_ptr": "*i8"}
    ints = {"G": "i32", "A": "i32", "L": "i32", "Q": "i32", "scale": "fp32"}
    const = {"LP": "constexpr", "BLOCK": "constexpr", "ACC": "constexpr"}
    if kernel == "flash":  # the forward from the band features (scoring without gradients)
        return {"ab_ptr": ptr, "qb_ptr": ptr, "gram_ptr": ptr, "amask_ptr": "*i8", "num_ptr": "*fp32",
                "n2_ptr": "*fp32", "G": "i32", "A": "i32", "L": "i32", "Q": "i32", "P2": "i32", "scale": "fp32",
                "LP": "constexpr", "BLOCK": "constexpr", "KB": "constexpr", "ACC": "constexpr"}
    if kernel.startswith("flash_bwd"):  # the flash backward: per anchor (d_ab, d_gram) and per query block (d_qb)
        outs = {"dab_ptr": ptr, "dgram_ptr": ptr} if kernel == "flash_bwd_anchor" else {"dqb_ptr": ptr}
        return {"ab_ptr": ptr, "qb_ptr": ptr, "gram_ptr": ptr, "amask_ptr": "*i8", "u_ptr": "*fp32", "w_ptr": "*fp32",
                **outs, "G": "i32", "A": "i32", "L": "i32", "Q": "i32", "P2": "i32", "scale": "fp32",
                "LP": "constexpr", "BLOCK": "constexpr", "PP": "constexpr", "ACC": "constexpr"}
    if kernel == "forward":  # outputs are float32 accumulators whatever the inputs
        return {**common, "num_ptr": "*fp32", "n2_ptr": "*fp32", **ints, **const}
    return {**common, "u_ptr": "*fp32", "w_ptr": "*fp32", "drho_ptr": ptr, "dgram_ptr": ptr, **ints, **const}


def _resources(cubin: bytes, tool: Path) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread of the cubin's one kernel, via cuobjdump."""
    if not tool.exists():
        return None, None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def compile_table(lengths=(16, 32, 64, 128), targets=tuple(TARGETS), dtypes=tuple(DTYPES)) -> list[dict]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hosa_lib import fused_triton as ft

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for L in lengths:
        meta = ft.launch(L)
        # the flash backward at the widest band it takes at this length (2P = PP - 1 > PP / 2)
        bwd = ft.flash_backward_launch(L, ft.FLASH_BWD_MAX_PP.get(meta["LP"], 2) - 1)  # None: no flash backward
        kernels = [("forward", ft._forward_kernel), ("backward", ft._backward_kernel),
                   ("flash", ft._flash_forward_kernel)]
        if bwd is not None:
            kernels += [("flash_bwd_anchor", ft._flash_backward_anchor_kernel),
                        ("flash_bwd_query", ft._flash_backward_query_kernel)]
        for kernel, fn in kernels:
            m = bwd if kernel.startswith("flash_bwd") else meta
            for dtype in dtypes:
                for target in targets:
                    cc, limit = TARGETS[target]
                    const = {"LP": m["LP"], "BLOCK": m["BLOCK"], "ACC": tl.float32}
                    const.update({"KB": ft.FLASH_KB} if kernel == "flash" else {"PP": m["PP"]} if m is bwd else {})
                    src = ASTSource(fn=fn, signature=_signature(kernel, DTYPES[dtype]), constexprs=const)
                    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                       options={"num_warps": m["num_warps"], "num_stages": m["num_stages"]})
                    regs, stack = _resources(k.asm["cubin"], tool)
                    rows.append({"L": L, **{x: m[x] for x in ("LP", "BLOCK", "num_warps", "num_stages")},
                                 "PP": m.get("PP"),
                                 "kernel": kernel, "dtype": dtype, "target": target, "shared": k.metadata.shared,
                                 "shared_limit": limit, "registers": regs, "stack": stack,
                                 "fits": k.metadata.shared <= limit and (regs is None or regs <= 255)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        import triton
    except ImportError:
        print("triton_aot: skipped, triton is not installed")
        return 0
    rows = compile_table(tuple(args.lengths), dtypes=tuple(args.dtypes))
    print(f"Triton {triton.__version__}: fused high-order kernels compiled ahead of time (no GPU)")
    print(f"{'L':>4} {'LP':>4} {'BLOCK':>5} {'warps':>5} {'stages':>6} {'PP':>4} {'kernel':>16} {'dtype':>8} "
          f"{'target':>6} "
          f"{'shared B':>9} {'limit B':>8} {'regs':>5} {'stack B':>7}  fits")
    for r in rows:
        print(f"{r['L']:>4} {r['LP']:>4} {r['BLOCK']:>5} {r['num_warps']:>5} {r['num_stages']:>6} {r['PP'] or '':>4} "
              f"{r['kernel']:>16} "
              f"{r['dtype']:>8} {r['target']:>6} {r['shared']:>9,} {r['shared_limit']:>8,} {r['registers']!s:>5} "
              f"{r['stack']!s:>7}  {'yes' if r['fits'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
