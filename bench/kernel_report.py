"""``python -m bench.kernel_report``: the Triton kernels as an H100/H200 would run them, without
a GPU, and a model of their speed.

1. **Compile** every shipped kernel config (``kernels/logprob_configs.py``) for sm_90a with the
   real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin).  The arguments come from the
   launchers' own argument builders (``logprob_fwd.forward_launch``, ``logprob_bwd.dx_launch``)
   called on meta tensors of realistic shapes, and go through Triton's own binder, so the
   divisibility hints (``tt.divisibility = 16`` on pointers and sizes) are exactly the ones a
   launch on a GPU passes: the aligned variant the GPU runs.
2. **Read the results**: ``ptxas -v`` (the ptxas Triton itself uses, same flags) for registers,
   spill stores/loads and stack; the SASS (``cuobjdump --dump-sass``) for wgmma (``HGMMA``),
   16-byte global loads (``LDGSTS...128``), global atomics (``RED``/``ATOM``) and fences
   (``MEMBAR``: an atomic with acquire/release semantics compiles to
   ``MEMBAR.ALL.GPU; ATOMG...; CCTL.IVALL``, a relaxed one to a bare ``REDG``).
3. **Model** each launch and the whole op (forward + backward) at the goal's shapes (bf16,
   N = 8192 and 16384, D = 4096, V = 128256) on an H200: see ``Machine`` and ``docs/kernels.md``.
   A model, not a measurement: ``make gpu-check`` measures.

Writes ``bench/results/sm90-kernels.md`` and ``bench/results/sm90-kernels.json`` (the op model,
which ``bench.auto_table`` turns into the ``backend="auto"`` fallback).  ``--check`` compiles the
CI subset and prints one JSON line per kernel (``tests/test_triton_compile.py``).
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GOAL_SHAPES = [(8192, 4096, 128256), (16384, 4096, 128256)]
SWEEP_SHAPES = [(8192, 4096, 32000), (8192, 4096, 256000)]


# ----------------------------------------------------------------------------- the machine

@dataclass(frozen=True)
class Machine:
    """The model's H200.  ``mma`` and ``hbm`` were measured on this workplace's H200 (a bf16
    8192^3 torch.mm on random data: 769-798 TFLOP/s; a device-to-device copy: 4.3 TB/s read
    + write; .library/device/KINDS.md).  ``l2`` is assumed, not measured: third-party figures
    for H100 L2 read bandwidth range from about 7 to 12 TB/s; the lower one is used.  The
    special-function unit (exp, reciprocal) does 16 results per clock per SM, the FP32 pipe
    128 (sm_90 throughput table)."""
    name: str = "H200 (model)"
    mma: float = 790e12        # bf16 dense flop/s
    fp32: float = 67e12        # FFMA flop/s (datasheet)
    hbm: float = 4.3e12        # bytes/s
    l2: float = 7e12           # bytes/s, assumed
    sms: int = 132
    clock: float = 1.98e9
    mufu_per_clk: int = 16
    alu_per_clk: int = 128


H200 = Machine()
H200_FAST_L2 = Machine(name="H200 (model, L2 12 TB/s)", l2=12e12)

# host time per launch from Python (assumed, not measured): a torch op on CUDA (a cuBLAS call
# included), one of our native-epilogue calls (pybind + the adapter's checks), a Triton launch
# (binder + launcher).  Launches are asynchronous: a phase takes the longer of its GPU time
# and the host time to issue it.
HOST_S = {"torch": 8e-6, "native": 25e-6, "triton": 30e-6}

# per-logit epilogue work (counted from the kernels' source; approximate): (ALU ops, MUFU ops)
EPILOGUE_OPS = {
    ("fwd", False, False): (9, 1), ("fwd", True, False): (22, 3),
    ("fwd", False, True): (17, 1), ("fwd", True, True): (30, 3),
    ("dx", False, False): (11, 1), ("dx", True, False): (26, 3),
}


def _es(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _rate(dtype: str, m: Machine) -> float:
    return m.fp32 if dtype == "fp32" else m.mma


def makespan(works: List[float], slots: int) -> float:
    """Greedy list schedule of programs (durations in launch order) on ``slots`` SMs."""
    free = [0.0] * min(slots, max(1, len(works)))
    heapq.heapify(free)
    end = 0.0
    for w in works:
        t = heapq.heappop(free) + w
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def tile_time(BN, BV, D, dtype, ops, m: Machine) -> float:
    """Seconds one SM spends on one [BN, BV] logit tile: the mainloop at the slower of the
    tensor-core rate and the SM's share of L2 bandwidth, then the epilogue (one program per
    SM at these register counts: nothing hides the epilogue behind another program's
    mainloop)."""
    es = _es(dtype)
    mma = 2 * BN * BV * D / (_rate(dtype, m) / m.sms)
    l2 = (BN + BV) * D * es / (m.l2 / m.sms)
    alu, mufu = ops
    epi = BN * BV * (alu / m.alu_per_clk + mufu / m.mufu_per_clk) / m.clock
    return max(mma, l2) + epi


def model_forward(N, D, V, dtype, cfg, splits, metrics=False, softcap=False, m=H200) -> Dict:
    es = _es(dtype)
    n_blocks = -(-N // cfg.block_n)
    v_tiles = -(-V // cfg.block_v)
    per_split = -(-v_tiles // splits)
    tiles = [min(per_split, v_tiles - s * per_split) for s in range(splits)]
    tau = tile_time(cfg.block_n, cfg.block_v, D, dtype, EPILOGUE_OPS[("fwd", softcap, metrics)], m)
    works = [tiles[s] * tau for _ in range(n_blocks) for s in range(splits)]  # order irrelevant
    flops = 2.0 * N * V * D
    side_by_side = max(cfg.group_n, m.sms // max(1, splits))
    hbm = N * D * es + V * D * es * -(-n_blocks // side_by_side) + 12 * splits * N + 8 * N
    l2 = n_blocks * v_tiles * (cfg.block_n + cfg.block_v) * D * es
    t = max(makespan(works, m.sms), hbm / m.hbm)
    return dict(programs=n_blocks * splits, gemm_eq=1.0, flops=flops, hbm_bytes=hbm,
                l2_bytes=l2, time_s=t, share=flops / _rate(dtype, m) / t)


def model_dx(n, vt, D, V, dtype, cfg, rich=False, m=H200) -> Dict:
    """One gradient-tile launch over a slab of n tokens x vt vocabulary ids."""
    es = _es(dtype)
    nb, nv = -(-n // cfg.block_n), -(-vt // cfg.block_v)
    tau = tile_time(cfg.block_n, cfg.block_v, D, dtype, EPILOGUE_OPS[("dx", rich, False)], m)
    flops = 2.0 * n * vt * D
    hbm = n * D * es + vt * D * es + nb * cfg.block_n * nv * cfg.block_v * es + 20 * n
    l2 = nb * nv * (cfg.block_n + cfg.block_v) * D * es
    t = max(makespan([tau] * (nb * nv), m.sms), hbm / m.hbm)
    return dict(programs=nb * nv, gemm_eq=n * vt / (n * V), flops=flops, hbm_bytes=hbm,
                l2_bytes=l2, time_s=t, share=flops / _rate(dtype, m) / t)


def _gemm(flops, hbm, dtype, m=H200):
    """A library GEMM: the slower of its flops at the measured cuBLAS rate and its bytes."""
    return max(flops / _rate(dtype, m), hbm / m.hbm), hbm


def model_op(backend: str, N, D, V, dtype="bf16", m=H200) -> Dict:
    """Forward + backward (dH and dW, no bias, no softcap) of one backend, with the defaults
    the library uses: kernel configs, slab and scratch sizes, the driver's placement of dH's
    fp32 sum (run on meta tensors)."""
    import torch
    from sgdpo_fast.kernels import logprob_bwd, logprob_fwd
    from sgdpo_fast.ops import sweep
    from sgdpo_fast.ops.plan import TileConfig

    es, tdt = _es(dtype), getattr(torch, DTYPES[dtype])
    meta = dict(device="meta", dtype=tdt)
    t_total = hbm_total = 0.0
    gemm_eq = 0.0
    parts = {}
    host = {"forward": 0.0, "backward": 0.0}
    if backend == "triton":
        fcfg = logprob_fwd.kernel_config(D, V, tdt)
        h = torch.empty(N, D, **meta)
        w = torch.empty(V, D, **meta)
        _, _, args, _, _ = logprob_fwd.forward_launch(
            h, w, None, torch.empty(N, dtype=torch.int64, device="meta"), sms=m.sms)
        splits = args[13]
        f = model_forward(N, D, V, dtype, fcfg, splits, m=m)
        host["forward"] = HOST_S["triton"] + 12 * HOST_S["torch"]   # + the split merge
        parts["forward"] = max(f["time_s"], host["forward"])
        t_total += parts["forward"]
        hbm_total += f["hbm_bytes"]
        gemm_eq += 1
        cfg = logprob_bwd.kernel_config(D, V, tdt)
        bn, bv = logprob_bwd.slab_shape(N, V, es, cfg)
        scratch = logprob_bwd.SCRATCH_BYTES
        extra = logprob_bwd.padded(bn, cfg.block_n) * logprob_bwd.padded(bv, cfg.block_v) * es
    elif backend == "cuda":
        tiles = TileConfig()
        bn, bv = tiles.shape(N, V)
        scratch = tiles.scratch_bytes
        half = es == 2
        extra = bn * bv * (4 + (es if half else 0)) + (bv * D * 4 if (half and N > bn) else 0)
        # forward: per tile a cuBLAS GEMM into fp32, then the fold kernel reads it back
        t_f = hbm_f = 0.0
        for n0 in range(0, N, bn):
            nb_ = min(bn, N - n0)
            for v0 in range(0, V, bv):
                vb = min(bv, V - v0)
                t, b = _gemm(2.0 * nb_ * vb * D, (nb_ + vb) * D * es + 4 * nb_ * vb, dtype, m)
                t_f += t + 4 * nb_ * vb / m.hbm
                hbm_f += b + 4 * nb_ * vb
                host["forward"] += 4 * HOST_S["torch"] + HOST_S["native"]
        parts["forward"] = max(t_f, host["forward"])
        t_total += parts["forward"]
        hbm_total += hbm_f
        gemm_eq += 1
    else:
        raise ValueError(backend)
    # backward: the driver's phases (placement of dH's fp32 sum computed on meta tensors)
    dH = torch.empty(N, D, **meta)
    dW = torch.empty(V, D, **meta)
    rows = -(-N // bn)
    left = scratch - (bv * D * 4 if (es == 2 and rows > 1) else 0)
    scratch_t = torch.empty(max(0, left) // (4 * D) * D, device="meta") if left >= 4 * D else None
    tail = V
    if es == 2:   # fp32 gradients are their own accumulators
        _, _, tail = sweep._dh_accumulators(dH, 0, D, scratch_t, dW=dW, cover_all=True)
    phases = [(0, tail, True, True)] + ([(tail, V, True, False), (tail, V, False, True)]
                                        if tail < V else [])
    t_b = hbm_b = 0.0
    for v_lo, v_hi, do_dh, do_dw in phases:
        for v0 in range(v_lo, v_hi, bv):
            vb = min(bv, v_hi - v0)
            for n0 in range(0, N, bn):
                nb_ = min(bn, N - n0)
                gemm_eq += nb_ * vb / (N * V)
                if backend == "triton":
                    r = model_dx(nb_, vb, D, V, dtype, cfg, m=m)
                    t_b += r["time_s"]
                    hbm_b += r["hbm_bytes"]
                    host["backward"] += HOST_S["triton"] + 6 * HOST_S["torch"]
                else:
                    t, b = _gemm(2.0 * nb_ * vb * D, (nb_ + vb) * D * es + 4 * nb_ * vb, dtype, m)
                    ep = (8 + 4 + es) * nb_ * vb   # grad epilogue in place + copy to half
                    t_b += t + ep / m.hbm
                    hbm_b += b + ep
                    host["backward"] += 8 * HOST_S["torch"] + HOST_S["native"]
                x = nb_ * vb * es
                host["backward"] += (do_dh + do_dw) * 2 * HOST_S["torch"]
                if do_dh:
                    gemm_eq += nb_ * vb / (N * V)
                    t, b = _gemm(2.0 * nb_ * vb * D, x + vb * D * es + 8 * nb_ * D, dtype, m)
                    t_b += t
                    hbm_b += b
                if do_dw:
                    gemm_eq += nb_ * vb / (N * V)
                    acc = 8 * vb * D if rows > 1 else vb * D * es
                    t, b = _gemm(2.0 * nb_ * vb * D, x + nb_ * D * es + acc, dtype, m)
                    t_b += t
                    hbm_b += b
    parts["backward"] = max(t_b, host["backward"])
    t_total += parts["backward"]
    hbm_total += hbm_b
    ideal = 4 * 2.0 * N * V * D / _rate(dtype, m)
    return dict(backend=backend, dtype=dtype, N=N, D=D, V=V, gemm_eq=round(gemm_eq, 3),
                hbm_gb=round(hbm_total / 1e9, 2), forward_ms=round(parts["forward"] * 1e3, 2),
                backward_ms=round(parts["backward"] * 1e3, 2),
                host_ms=round((host["forward"] + host["backward"]) * 1e3, 2),
                modeled_ms=round(t_total * 1e3, 2), roofline_pct=round(100 * ideal / t_total, 1),
                extra_mib=round((extra + (max(0, left) if es == 2 else 0)) / 2 ** 20, 1),
                tail_fraction=round((V - tail) / V, 3))


# ----------------------------------------------------------------------------- compiling

@dataclass(frozen=True)
class Variant:
    kernel: str       # "fwd" or "dx"
    dtype: str        # "bf16", "fp16", "fp32"
    D: int
    V: int
    bias: bool = False
    softcap: bool = False
    metrics: bool = False
    N: int = 8192

    @property
    def label(self) -> str:
        flags = [f for f, on in (("bias", self.bias), ("softcap", self.softcap),
                                 ("metrics", self.metrics)) if on]
        return f"{self.dtype} D={self.D} V={self.V} " + ("+".join(flags) or "plain")


VARIANTS = [Variant("fwd", "bf16", 4096, 128256), Variant("fwd", "bf16", 4096, 128256, bias=True),
            Variant("fwd", "bf16", 4096, 128256, softcap=True),
            Variant("fwd", "bf16", 4096, 128256, metrics=True),
            Variant("fwd", "bf16", 4096, 128256, True, True, True),
            Variant("fwd", "fp16", 4096, 128256),
            Variant("fwd", "bf16", 576, 49152), Variant("fwd", "bf16", 576, 49152, True, True, True),
            Variant("fwd", "fp32", 4096, 128256), Variant("fwd", "fp32", 4096, 128256, True, True, True),
            Variant("dx", "bf16", 4096, 128256), Variant("dx", "bf16", 4096, 128256, bias=True),
            Variant("dx", "bf16", 4096, 128256, softcap=True),
            Variant("dx", "bf16", 4096, 128256, True, True),
            Variant("dx", "fp16", 4096, 128256),
            Variant("dx", "bf16", 576, 49152), Variant("dx", "bf16", 576, 49152, True, True),
            Variant("dx", "fp32", 4096, 128256), Variant("dx", "fp32", 4096, 128256, True, True)]

# every distinct config with its plainest and its richest epilogue (CI: tests/test_triton_compile.py)
CI_VARIANTS = [VARIANTS[i] for i in (0, 4, 7, 9, 10, 13, 16, 18)]


def _launch(v: Variant):
    """``(kernel, args, kwargs, cfg, grid)`` of the launch a GPU would make for ``v``, built by
    the launchers on meta tensors."""
    import torch
    from sgdpo_fast.kernels import logprob_bwd as B, logprob_fwd as F
    from sgdpo_fast.ops.transform import LogitTransform

    dt = getattr(torch, DTYPES[v.dtype])
    meta = dict(device="meta")
    h = torch.empty(v.N, v.D, dtype=dt, **meta)
    w = torch.empty(v.V, v.D, dtype=dt, **meta)
    b = torch.empty(v.V, dtype=dt, **meta) if v.bias else None
    t = torch.empty(v.N, dtype=torch.int64, **meta)
    softcap = 30.0 if v.softcap else None
    if v.kernel == "fwd":
        kernel, grid, args, kwargs, _ = F.forward_launch(h, w, b, t, softcap=softcap,
                                                         metrics=v.metrics, sms=H200.sms)
        cfg = F.kernel_config(v.D, v.V, dt, v.bias, v.softcap, v.metrics)
        return kernel, args, kwargs, cfg, grid
    cfg = B.kernel_config(v.D, v.V, dt, v.bias, v.softcap)
    bn, bv = B.slab_shape(v.N, v.V, h.element_size(), cfg)
    slab = torch.empty(B.padded(bn, cfg.block_n), B.padded(bv, cfg.block_v), dtype=dt, **meta)
    lse = torch.empty(v.N, **meta)
    db = torch.empty(v.V, **meta) if v.bias else None
    v0 = bv  # the second vocabulary chunk: offsets as in the middle of a sweep
    kernel, grid, args, kwargs = B.dx_launch(
        h[:bn], w[v0:v0 + bv], None if b is None else b[v0:v0 + bv], t[:bn], lse[:bn],
        lse[:bn], v0, slab, None if db is None else db[v0:v0 + bv],
        LogitTransform(softcap=softcap), cfg)
    return kernel, args, kwargs, cfg, grid


def compile_sm90(kernel, args, kwargs):
    """Compile a launch for sm_90a exactly as ``kernel[grid](*args, **kwargs)`` would on an
    H100/H200: Triton's own binder computes the specialization (types, divisibility by 16,
    constants) from the arguments."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound,
                                                              specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    aligned = sorted(kernel.arg_names[k[0]] for k, v in attrs.items() if v)
    return compiled, aligned


def _tool(name):
    from triton import knobs
    return os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), name)


def read_sass(compiled) -> Dict:
    """Resources from ``ptxas -v`` and instruction counts from the SASS."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--gpu-name=sm_90a", ptx,
                              "-o", ptx + ".o"], capture_output=True, text=True, check=True).stderr
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True,
                              text=True, check=True).stdout

    def num(pattern):
        mt = re.search(pattern, log)
        return int(mt.group(1)) if mt else 0

    instr = [ln.split("*/", 1)[1].strip() for ln in sass.splitlines()
             if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
    ops = [i.lstrip("@!P0123456789UPT ").split(" ")[0] for i in instr]

    def count(prefix):
        return sum(1 for o in ops if o.startswith(prefix))

    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                shared=compiled.metadata.shared, hgmma=count("HGMMA"), hmma=count("HMMA"),
                vector_loads=sum(1 for o in ops if o.startswith(("LDGSTS", "LDG")) and o.endswith(".128")),
                scalar_stores=sum(1 for o in ops if o.startswith("STG") and not o.endswith((".128", ".64"))),
                atomics=count("RED") + count("ATOM"), fences=count("MEMBAR") + count("CCTL.IVALL"),
                local=count("LDL") + count("STL"))


def compile_variant(v: Variant) -> Dict:
    kernel, args, kwargs, cfg, grid = _launch(v)
    t0 = time.time()
    compiled, aligned = compile_sm90(kernel, args, kwargs)
    row = dict(asdict(v), label=v.label, config=asdict(cfg), grid=list(grid), aligned=aligned)
    row.update(read_sass(compiled))
    return row, round(time.time() - t0, 1)


# ----------------------------------------------------------------------------- the report

def _fmt_bytes(b):
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 2 ** 20:.1f} MiB"


def per_launch_model(row: Dict, N: int) -> Dict:
    """The model of one launch of a compiled variant at N tokens."""
    from sgdpo_fast.kernels import logprob_bwd
    from sgdpo_fast.kernels.logprob_configs import KernelConfig
    cfg = KernelConfig(**row["config"])
    D, V, dt = row["D"], row["V"], row["dtype"]
    if row["kernel"] == "fwd":
        v = Variant(**{k: row[k] for k in Variant.__dataclass_fields__ if k != "N"}, N=N)
        splits = _launch(v)[1][13]   # the launcher's own split count at this N
        return model_forward(N, D, V, dt, cfg, splits, row["metrics"], row["softcap"])
    bn, bv = logprob_bwd.slab_shape(N, V, _es(dt), cfg)
    return model_dx(bn, bv, D, V, dt, cfg, rich=row["bias"] or row["softcap"])


def markdown(rows: List[Dict], ops: List[Dict], meta: Dict) -> str:
    L = [f"# Triton kernels on sm_90a (H100/H200): resources and a speed model",
         "",
         f"Generated by `python -m bench.kernel_report` ({meta['triton']}, {meta['ptxas']}); "
         "no GPU involved. Every kernel is compiled from the arguments its launcher builds at "
         "a realistic shape (meta tensors through Triton's binder: the aligned variant a GPU "
         "runs). `spills` = ptxas spill stores + loads (bytes per thread); `wgmma` = HGMMA "
         "instructions in the SASS; `16B loads` = 16-byte global loads (cp.async); `fenced` = "
         "MEMBAR / CCTL.IVALL around global atomics (relaxed atomics compile to a bare REDG).",
         "",
         f"Model ({H200.name}): tensor cores {H200.mma / 1e12:.0f} TFLOP/s and HBM "
         f"{H200.hbm / 1e12:.1f} TB/s as measured on this workplace's H200; L2 "
         f"{H200.l2 / 1e12:.0f} TB/s assumed; one program per SM; a tile costs the slower of its "
         "mainloop at the tensor-core rate and at the SM's share of L2 bandwidth, plus its "
         "epilogue (special-function unit 16/clk/SM, FP32 128/clk/SM); programs are scheduled "
         "greedily in launch order; a launch takes at least its HBM bytes / bandwidth. "
         "`share` = its flops at the tensor-core rate / modeled time. Upper bounds: "
         "instruction issue, latencies and launch gaps are not modeled.", ""]
    for kernel, title in (("fwd", "Forward (`kernels/logprob_fwd.py`), one launch per op"),
                          ("dx", "Backward gradient tile (`kernels/logprob_bwd.py`), one launch "
                                 "per slab")):
        L += [f"## {title}", "",
              "| variant | block NxVxD, warps, stages | regs | spills (B) | stack | smem KiB | "
              "wgmma | 16B loads | atomics | fenced | N | programs | GEMM-eq/launch | HBM/launch "
              "| L2/launch | modeled ms | share |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["kernel"] != kernel:
                continue
            c = r["config"]
            for N in (8192, 16384) if r["D"] == 4096 else (2048,):
                mdl = per_launch_model(r, N)
                L.append(
                    f"| {r['label']} | {c['block_n']}x{c['block_v']}x{c['block_d']}, "
                    f"{c['num_warps']}, {c['num_stages']} | {r['registers']} | "
                    f"{r['spill_stores'] + r['spill_loads']} | {r['stack']} | "
                    f"{r['shared'] // 1024} | {'yes' if r['hgmma'] else 'no'} | "
                    f"{r['vector_loads']} | {r['atomics']} | {'yes' if r['fences'] else 'no'} | {N} | "
                    f"{mdl['programs']} | {mdl['gemm_eq']:.3f} | {_fmt_bytes(mdl['hbm_bytes'])} | "
                    f"{_fmt_bytes(mdl['l2_bytes'])} | {mdl['time_s'] * 1e3:.2f} | "
                    f"{100 * mdl['share']:.0f}% |")
        L.append("")
    L += ["## The whole op, forward + backward (dH and dW), modeled", "",
          "`triton`: the forward kernel, then per slab the gradient-tile kernel and two cuBLAS "
          "GEMMs (dH with an fp32 accumulator, dW written once). `cuda`: per tile a cuBLAS "
          "GEMM into an fp32 tile and a CUDA epilogue (forward: fold; backward: gradient in "
          "place, copy to bf16), then the same two GEMMs. GEMM-eq counts 2 N V D flops each "
          "(4 = forward, one recompute, dH, dW; more where the driver re-runs the tiles of "
          "dW's tail whose bytes held dH's fp32 sum: `tail`). `% roofline` = 4 GEMM-eq at "
          f"the dtype's rate (bf16/fp16: {H200.mma / 1e12:.0f} TFLOP/s; fp32, IEEE on the FMA "
          f"units: {H200.fp32 / 1e12:.0f}) / modeled time. `host ms` = the time to issue the "
          "launches from Python (assumed per launch: torch op 8 us, native epilogue call 25 us, "
          "Triton launch 30 us); a phase takes the longer of GPU and host time. `extra` = the "
          "backward's buffers beyond inputs and gradients. The last two columns redo the model "
          "with a 12 TB/s L2: the Triton mainloop is L2-bound at 7 TB/s (128x256 tiles need "
          "~9.3 TB/s at the full tensor-core rate, 128x128 ~12 TB/s), cuBLAS (2-SM clusters "
          "with multicast loads) is not.", "",
          "| backend | dtype | N | D | V | GEMM-eq | tail | HBM GB | fwd ms | bwd ms | host ms | "
          "total ms | % roofline | extra MiB | total ms (L2 12 TB/s) | % roofline (L2 12 TB/s) |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for o in ops:
        L.append(f"| {o['backend']} | {o['dtype']} | {o['N']} | {o['D']} | {o['V']} | "
                 f"{o['gemm_eq']} | {o['tail_fraction']} | {o['hbm_gb']} | {o['forward_ms']} | "
                 f"{o['backward_ms']} | {o['host_ms']} | {o['modeled_ms']} | "
                 f"{o['roofline_pct']}% | {o['extra_mib']} | {o['modeled_ms_fast_l2']} | "
                 f"{o['roofline_pct_fast_l2']}% |")
    L += ["", "Goal (issue 14): at least 60% of the 4-GEMM roofline, at most 64 MiB beyond "
          "inputs and gradients, at most 0.8x the fastest peer measured in the same run "
          "(`make gpu-check`)."]
    return "\n".join(L) + "\n"


def _versions() -> Dict:
    import triton
    from triton import knobs
    out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True,
                         text=True).stdout
    mt = re.search(r"release ([\d.]+)", out)
    return dict(triton=f"Triton {triton.__version__}",
                ptxas=f"ptxas {mt.group(1) if mt else '?'} (Triton's own)")


def op_models() -> List[Dict]:
    """The op model of both backends at the goal's and the vocabulary sweep's shapes; each row
    also carries the total under the faster-L2 assumption (``modeled_ms_fast_l2``)."""
    rows = []
    cases = [(dt, s) for dt in ("bf16", "fp16") for s in GOAL_SHAPES + SWEEP_SHAPES] + \
        [("fp32", s) for s in GOAL_SHAPES]
    for dtype, (N, D, V) in cases:
        for b in ("triton", "cuda"):
            row = model_op(b, N, D, V, dtype)
            fast = model_op(b, N, D, V, dtype, m=H200_FAST_L2)
            row["modeled_ms_fast_l2"] = fast["modeled_ms"]
            row["roofline_pct_fast_l2"] = fast["roofline_pct"]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(RESULTS, "sm90-kernels.md"))
    p.add_argument("--check", action="store_true",
                   help="compile the CI subset, print one JSON line per kernel, write nothing")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the report compiles for a GPU", file=sys.stderr)
        return 2
    variants = CI_VARIANTS if args.check else VARIANTS
    rows = []
    for v in variants:
        row, seconds = compile_variant(v)
        rows.append(row)
        if args.check:
            print("KERNEL " + json.dumps(row), flush=True)
        else:
            print(f"{v.kernel:3s} {v.label:40s} regs {row['registers']:3d} spills "
                  f"{row['spill_stores'] + row['spill_loads']:4d} smem {row['shared'] // 1024:3d} KiB "
                  f"wgmma {row['hgmma']} atomics {row['atomics']} fences {row['fences']} "
                  f"({seconds} s)", flush=True)
    if args.check:
        return 0
    ops = op_models()
    meta = _versions()
    with open(args.out, "w") as f:
        f.write(markdown(rows, ops, meta))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(meta, machine=asdict(H200), kernels=rows, ops=ops), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
