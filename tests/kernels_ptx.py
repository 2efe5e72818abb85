"""Compile every Triton kernel to PTX for sm_90 (no GPU needed) and check the instructions that matter.

The interpreter accepts code the GPU compiler rejects, so the kernels are also compiled for a real target.
Triton builds its standard library (``tl.sum``, ``tl.zeros``, ...) in the mode ``TRITON_INTERPRET`` has when
triton is first imported, and the test session imports it in interpreter mode (``tests/conftest.py``); a
compile for sm_90 needs the compiled mode. So this file runs as its own process, without ``TRITON_INTERPRET``
and without ``conftest``: ``python tests/kernels_ptx.py OP`` (``tests/test_kernels_ptx.py`` does that per op).

Exit status: 0 checked, 1 a check failed (traceback), :data:`SKIP_STATUS` when this triton build cannot compile
for CUDA (the reason on stdout).
"""

from __future__ import annotations

import os
import sys

SKIP_STATUS = 77
OPS = ("denoise_step", "transition_scores", "nabla_db_loss", "forward_looking")


def ptx(fn, sig: dict[str, str], constexprs: dict, num_warps: int = 4, aligned: tuple[str, ...] = (),
        **options) -> str:
    """PTX of ``fn`` for sm_90. Pointer arguments, ``n_per_sample`` and the names in ``aligned`` are declared
    16-divisible (as SD latents are), which is what lets the compiler vectorise loads and stores."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
             if kind.startswith("*") or name == "n_per_sample" or name in aligned}
    source = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, **options}).asm["ptx"]


def check_denoise_step() -> None:
    from fastnabla.kernels import denoise_step as kernels

    fwd, bwd = kernels._fwd_kernel.jit(), kernels._bwd_kernel.jit()
    ptrs = ["x", "eps", "eps_c", "z", "a", "b", "sigma", "abar", "x_next", "x_hat"]
    sig = {f"{p}_ptr": "*fp32" if p in ("a", "b", "sigma", "abar") else "*bf16" for p in ptrs}
    sig.update(n_per_sample="i64", guidance_scale="fp32")
    code = ptx(fwd, sig, {"CFG": True, "BLOCK": 1024}, enable_fp_fusion=False)  # as launched
    assert "sqrt.rn.f32" in code and "div.rn.f32" in code
    assert "ld.global.v4" in code  # 16-byte vector loads (8 bf16)
    bsig = {f"{p}_ptr": "*fp32" for p in ("g_next", "g_hat", "a", "b", "sigma", "abar", "dx", "deps", "deps_c", "dz")}
    bsig.update(n_per_sample="i64", guidance_scale="fp32")
    flags = {"CFG": True, "NEED_X": True, "NEED_EPS": True, "NEED_EPS_C": False, "NEED_Z": True, "BLOCK": 2048}
    assert "ld.global.v4" in ptx(bwd, bsig, flags, 8, enable_fp_fusion=False)


def check_transition_scores() -> None:
    from fastnabla.kernels import transition_scores as kernels

    fwd, bwd = kernels._fwd_kernel.jit(), kernels._bwd_kernel.jit()

    def signature(ptrs: list[str]) -> dict[str, str]:
        sig = {f"{p}_ptr": "*fp32" if p in ("a", "b", "sigma", "abar") else "*bf16" for p in ptrs}
        return {**sig, "n_per_sample": "i64", "prior_strength": "fp32"}

    ptrs = ["x", "xn", "eps", "eps_pretrained", "fl", "a", "b", "sigma", "abar", "fwd", "rev", "cot",
            "cot_pretrained", "x_hat"]
    flags = {"HAS_FL": True, "FL_INTO_PRETRAINED": False, "W_FWD": True, "W_REV": True, "W_COT": True,
             "W_COT_PRETRAINED": True,
             "W_HAT": True, "BLOCK": 1024}
    code = ptx(fwd, signature(ptrs), flags, 4, enable_fp_fusion=False)
    assert "sqrt.rn.f32" in code and "div.rn.f32" in code and "ld.global.v4" in code
    ptrs = ["g_fwd", "g_rev", "g_cot", "g_cot_pretrained", "g_hat", "a", "b", "sigma", "abar", "dx", "dxn", "deps",
            "deps_pretrained", "dfl"]
    flags = {k: True for k in ("G_FWD", "G_REV", "G_COT", "G_COT_PRETRAINED", "G_HAT", "NEED_X", "NEED_XN", "NEED_EPS",
                               "NEED_EPS_PRETRAINED", "NEED_FL")}
    code = ptx(bwd, signature(ptrs), {**flags, "FL_INTO_PRETRAINED": True, "BLOCK": 2048}, 8, enable_fp_fusion=False)
    assert "ld.global.v4" in code


def check_nabla_db_loss() -> None:
    from fastnabla.kernels import nabla_db_loss as kernels

    partial, finalize, bwd = kernels._partial_kernel.jit(), kernels._finalize_kernel.jit(), kernels._bwd_kernel.jit()
    states = ["x", "xn", "eps", "eps_pretrained", "vjp", "vjp_pretrained", "fl_t", "fl_n", "g_t", "g_n", "eps_old",
              "target"]
    sig = {f"{p}_ptr": "*bf16" for p in states}
    sig.update({f"{p}_ptr": "*fp32" for p in ("a", "b", "sigma", "term", "partial")})
    sig.update(n_per_sample="i64", prior_strength="fp32")
    code = ptx(partial, sig, {"TARGET": False, "REG": True, "BLOCK": 1024}, enable_fp_fusion=False)
    assert "ld.global.v4" in code and "div.rn.f32" in code  # 16-byte vector loads (8 bf16)
    fsig = {f"{p}_ptr": "*fp32" for p in ("partial", "term", "w_f", "w_b", "terms")}
    fsig.update(n_blocks="i32", batch="i32", inv_n="fp32", output_reg="fp32")
    ptx(finalize, fsig, {"BLOCK_P": 64}, enable_fp_fusion=False)
    bsig = {f"{p}_ptr": "*bf16" for p in states}
    bsig.update({f"{p}_ptr": "*fp32" for p in ("a", "b", "sigma", "term", "w_f", "w_b", "up")})
    grads = ["dx", "dxn", "deps", "deps_pretrained", "dvjp", "dvjp_pretrained", "dfl_t", "dfl_n", "dg_t", "dg_n",
             "deps_old"]
    bsig.update({f"{p}_ptr": "*bf16" for p in grads})
    bsig.update(n_per_sample="i64", prior_strength="fp32", output_reg="fp32", scale="fp32")
    # NEED_F / NEED_R are the kernel's heuristics at launch; the bare jit function takes them as parameters
    flags = {"TARGET": False, "REG": True, "SECOND": True, "FWD_TRAINS_FLOW": True, "NEED_F": True, "NEED_R": True}
    flags.update({f"N_{k}": True for k in ("X", "XN", "EPS", "EPS_PRETRAINED", "VJP", "VJP_PRETRAINED", "FL_T",
                                           "FL_N", "G_T",
                                            "G_N", "EPS_OLD")})
    code = ptx(bwd, bsig, {**flags, "BLOCK": 2048}, enable_fp_fusion=False)
    assert "ld.global.v4" in code and "st.global.v4" in code


def check_forward_looking() -> None:
    """The noisy-copies and accumulate kernels of the forward-looking op and the image post-processing pair."""
    from fastnabla.kernels import forward_looking as flk
    from fastnabla.kernels import image_postprocess as ipk

    noisy, accumulate = flk._noisy_copies_kernel.jit(), flk._accumulate_kernel.jit()
    fwd, bwd = ipk._postprocess_fwd_kernel.jit(), ipk._postprocess_bwd_kernel.jit()
    ints = {"n_per_sample": "i64", "batch": "i64", "row_start": "i64"}
    for mode in (0, 1, 2):  # no noise, noise tensor, Philox
        code = ptx(noisy, {"x_hat_ptr": "*fp32", "noise_ptr": "*fp32", "out_ptr": "*bf16", **ints, "std": "fp32",
                           "seed": "i64"}, {"NOISE": mode, "BLOCK": 2048}, 8, enable_fp_fusion=False)
        assert "st.global" in code and ("mul.hi.u32" in code) == (mode == 2)  # Philox only when generating
    code = ptx(accumulate, {"grad_ptr": "*bf16", "acc_ptr": "*fp32", "scale_ptr": "*fp32", "n_per_sample": "i64",
                            "batch": "i64", "num_noise": "i64", "row_start": "i64", "row_stop": "i64", "inv_k": "fp32"},
               {"BLOCK": 2048}, 8)
    assert "ld.global.v4" in code  # vectorised loads of the fp32 accumulator
    code = ptx(fwd, {"raw_ptr": "*bf16", "image_ptr": "*fp32", "numel": "i64"}, {"BLOCK": 4096}, 8,
               aligned=("numel",))
    assert "ld.global.v4" in code and "st.global.v4" in code
    code = ptx(bwd, {"grad_ptr": "*fp32", "raw_ptr": "*bf16", "grad_raw_ptr": "*bf16", "numel": "i64"},
               {"BLOCK": 4096}, 8, aligned=("numel",))
    assert "ld.global.v4" in code


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in OPS:
        print(f"usage: python tests/kernels_ptx.py {{{','.join(OPS)}}}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the interpreter cannot compile for a GPU target", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed")
        return SKIP_STATUS
    check = globals()[f"check_{argv[0]}"]
    try:
        check()
    except (RuntimeError, ImportError, FileNotFoundError) as err:  # no CUDA backend / ptxas in this build
        print(f"triton cannot compile for CUDA here: {type(err).__name__}: {err}")
        return SKIP_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
