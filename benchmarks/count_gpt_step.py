"""Kernels, views and memory traffic of one GPT train step (stage 04), counted on the CPU with
CUDA's dispatch modelled: what a GPU would launch and move, without a GPU.

    python benchmarks/count_gpt_step.py                      # paper config, bf16 autocast, batch 64
    python benchmarks/count_gpt_step.py --precision fp16 --batch-size 16
    python benchmarks/count_gpt_step.py --ops 20             # and the 20 ops that launch the most

One step is 04_train_gpt.optimizer_step: forward under autocast, cross-entropy, backward,
gradient clipping at 1, fused Adam. The second step is counted (the first also creates Adam's
state). Tensors are fake (torch's FakeTensorMode: shapes, dtypes and strides without data), so the
paper's configuration at batch 64 takes seconds. Each aten op that reaches the dispatcher is a view
(it returns an alias of its input: view, transpose, expand, detach ...; no kernel), an allocation
(no kernel) or kernels: one launch, or as many as CUDA makes for it (LAUNCHES, multi-tensor ops).
Bytes are an estimate: each kernel reads its inputs and writes its outputs once (a broadcast input
once). Matmuls and fused attention are counted apart; the rest is memory-bound traffic:
"elementwise" (with casts and reductions) and the optimizer's, which is per step, not per clip.

CUDA's dispatch, where it differs from the CPU's, as torch does it on an H100:
  - scaled_dot_product_attention takes the backend CUDA would choose for the shapes, dtypes and
    dropout (cuda_attention_backend: cuDNN, flash, memory-efficient or math), run as that backend's
    aten op; its input casts are autocast's.
  - dropout is CUDA's one fused kernel (native_dropout), not the CPU's bernoulli, div and mul.
  - foreach ops (gradient clipping) launch as CUDA's multi_tensor_apply does: up to 110 to 30
    tensors (by the number of tensor lists) and 320 chunks of 65,536 elements per launch.
  - autocast is the CPU's, which casts the same ops as CUDA's in this model: an op that CUDA's
    autocast would cast and the CPU's does not is reported.
Each module's forward ops are its own (not its children's); its backward ops are those of the
autograd nodes its forward made.
"""
import argparse
import contextlib
import importlib.util
import math
import re
import sys
from argparse import Namespace
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils._foreach_utils as foreach_utils
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from paper.gpt import GPTPrior, GPT_COND_DIM

_spec = importlib.util.spec_from_file_location("stage04", REPO / "04_train_gpt.py")
stage04 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage04)

# ops that return a tensor sharing its input's memory without saying so in their schema
UNANNOTATED_VIEWS = {"_unsafe_view", "_reshape_alias", "lift_fresh"}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# CUDA launches of the ops that are not one kernel there: composites run op by op on every device
# (_safe_softmax: softmax, 2 fills, eq, all, where; a slice's backward: zeros, copy) and the fused
# attention's backward passes (flash: dot(dO, O), the main loop, dQ's conversion; memory-efficient:
# the workspace's zeroing, the main loop)
LAUNCHES = {"_safe_softmax": 6, "slice_backward": 2, "select_backward": 2,
            "_scaled_dot_product_flash_attention_backward": 3,
            "_scaled_dot_product_efficient_attention_backward": 2}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}
ATTENTION = re.compile(r"_scaled_dot_product_(flash|efficient|cudnn)_attention")
REDUCTIONS = {"sum", "mean", "var_mean", "var", "std", "amax", "amin", "all", "any", "norm",
              "linalg_vector_norm", "_softmax", "_safe_softmax", "_log_softmax",
              "_softmax_backward_data", "_log_softmax_backward_data", "native_layer_norm",
              "native_layer_norm_backward", "nll_loss_forward", "nll_loss_backward"}
# multi_tensor_apply's limits per launch, by the number of tensor lists (CUDA's ForeachFunctors)
MAX_TENSORS = (110, 64, 48, 36, 30)
MAX_CHUNKS, CHUNK = 320, 65536
# ops that CUDA's autocast lists and the CPU's does not, but in the lower precision: a bf16 or fp16
# input stays as it is on both
LOWER_PRECISION_ON_CUDA = {"_convolution", "convolution", "cudnn_convolution",
                           "cudnn_convolution_transpose", "addmv", "addr", "mv", "dot", "vdot",
                           "chain_matmul", "linalg_multi_dot", "einsum"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="clips per step (default 64)")
    p.add_argument("--precision", default="bf16", choices=common.PRECISIONS)
    p.add_argument("--ops", type=int, default=0, help="also list the N ops that launch the most")
    p.add_argument("--hidden-dim", type=int, default=576)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    return p.parse_args()


# --------------------------------------------------------------------------------------------------
# CUDA's dispatch, modelled
# --------------------------------------------------------------------------------------------------
def cuda_attention_backend(q, k, v, dropout_p, is_causal):
    """The backend of torch's CUDA scaled_dot_product_attention on an H100 for dense q, k, v
    (B, heads, L, d) without a mask, in its priority order: cuDNN (preferred on sm90 with recent
    cuDNN), flash, memory-efficient, math. The checks are sdp_utils.cpp's that can fail here."""
    d_qk, d_k, d_v = q.shape[-1], k.shape[-1], v.shape[-1]
    half = q.dtype in (torch.float16, torch.bfloat16)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # cuDNN: dropout in steps of 1/16, widths multiples of 8 up to 256 (backward: 128, or 192 with
    # 128, or 256 with 256), q, k and v laid out (B, L, heads, d)
    cudnn_widths = d_qk % 8 == 0 and d_v % 8 == 0 and d_qk <= 256 and d_v <= 256 and (
        not grad or (d_qk <= 128 and d_v <= 128) or (d_qk, d_v) in ((192, 128), (256, 256)))
    cudnn_layout = all(t.stride()[1:] == (t.shape[-1], t.shape[1] * t.shape[-1], 1)
                       for t in (q, k, v))
    if half and (dropout_p * 16).is_integer() and cudnn_widths and cudnn_layout:
        return "cudnn"
    # flash: equal widths up to 256 (it pads them to a multiple of 8 itself), square if causal
    if half and d_qk == d_k == d_v <= 256 and not (is_causal and q.shape[-2] != k.shape[-2]):
        return "flash"
    alignment = 8 if half else 4          # memory-efficient: minimum_gemm_alignment from sm80 on
    if d_qk == d_k and d_qk % alignment == 0 and d_v % alignment == 0:
        return "efficient"
    return "math"


def cuda_sdpa(backends):
    """F.scaled_dot_product_attention as CUDA runs it (without a mask or GQA, as this model calls
    it); `backends` counts the backends taken."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        assert attn_mask is None, "the model is expected to call SDPA without a mask"
        if torch.is_autocast_enabled("cpu"):        # autocast casts SDPA's inputs on CUDA too
            low = torch.get_autocast_dtype("cpu")
            q, k, v = (t.to(low) if t.dtype == torch.float32 else t for t in (q, k, v))
        backend = cuda_attention_backend(q, k, v, dropout_p, is_causal)
        backends[backend, tuple(q.shape), tuple(v.shape)] += 1
        aten = torch.ops.aten
        with torch.autocast("cpu", enabled=False):
            if backend == "flash":
                return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                                scale=scale)[0]
            if backend == "efficient":
                return aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, torch.is_grad_enabled(), dropout_p, is_causal, scale=scale)[0]
            if backend == "cudnn":
                return aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, torch.is_grad_enabled(), dropout_p, is_causal,
                    scale=scale)[0]
            return aten._scaled_dot_product_attention_math(q, k, v, None, dropout_p, is_causal,
                                                           scale=scale)[0]
    return sdpa


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as CUDA runs it: one fused kernel (mask and scaling) when it drops anything."""
    if training and 0 < p < 1:
        return torch.ops.aten.native_dropout(input, p, True)[0]
    return input


@contextlib.contextmanager
def cuda_dispatch(backends):
    """Model CUDA's dispatch where it differs from the CPU's (see the module's docstring)."""
    saved = F.scaled_dot_product_attention, F.dropout, list(foreach_utils._foreach_supported_types)
    F.scaled_dot_product_attention, F.dropout = cuda_sdpa(backends), cuda_dropout
    foreach_utils._foreach_supported_types.append(FakeTensor)   # real tensors take foreach paths
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = saved[:2]
        foreach_utils._foreach_supported_types[:] = saved[2]


def multi_tensor_launches(tensor_lists):
    """Launches of CUDA's multi_tensor_apply over `tensor_lists` (lists of matching tensors)."""
    max_tensors = MAX_TENSORS[min(len(tensor_lists), len(MAX_TENSORS)) - 1]
    launches, tensors, chunks = 0, 0, 0
    for t in tensor_lists[0]:
        if t.numel() == 0:
            continue
        tensors += 1
        n_chunks = math.ceil(t.numel() / CHUNK)
        for chunk in range(n_chunks):
            chunks += 1
            last = chunk == n_chunks - 1
            if chunks == MAX_CHUNKS or (last and tensors == max_tensors):
                launches, chunks, tensors = launches + 1, 0, 0 if last else 1
    return launches + (chunks > 0)


# --------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------
def unique_bytes(t):
    """Bytes a kernel touches in `t`: its broadcast (stride 0) dimensions once."""
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def category(name, args, out):
    """What a kernel's bytes count as: matmul, attention, cast, reduction or elementwise."""
    if name in MATMULS:
        return "matmul"
    if ATTENTION.match(name):
        return "attention"
    if name in ("_to_copy", "copy_") and args[0].dtype != tensors_in(out)[0].dtype:
        return "cast"
    return "reduction" if name in REDUCTIONS else "elementwise"


def launches(name, args):
    """CUDA kernel launches of one aten op."""
    if name.startswith(("_foreach_", "_fused_")):
        lists = [a for a in args if isinstance(a, (list, tuple)) and tensors_in(a)]
        if name.startswith("_fused_"):
            lists = lists[:-1]                        # the step counts ride along
        return multi_tensor_launches(lists) + (name == "_foreach_norm")   # + norm's cleanup
    if name == "convolution_backward":
        return sum(args[-1])                          # grad input, weight, bias as asked
    if name == "native_layer_norm_backward":
        return 1 + (args[-1][1] or args[-1][2])       # dX; then dgamma and dbeta together
    if name == "constant_pad_nd":
        return 1 + any(p > 0 for p in args[1])        # a fill where it pads, then the copy
    return LAUNCHES.get(name, 1)


class KernelCounter(TorchDispatchMode):
    """Classifies every aten op (view, allocation, kernels) and books its launches and bytes under
    (phase, module): phase forward, backward or optimizer; the module whose forward runs (forward)
    or whose forward made the autograd node that runs (backward)."""

    def __init__(self, labels):
        super().__init__()
        self.labels, self.module_stack = labels, []
        self.phase = "forward"
        self.rows = defaultdict(Counter)        # (phase, module) -> kernels, views, bytes by kind
        self.ops, self.op_bytes = Counter(), Counter()      # op name -> launches, bytes
        self.autocast_differs = Counter()       # ops CUDA's autocast would cast, the CPU's not

    def where(self):
        node = torch._C._current_autograd_node()
        if node is not None:
            self.phase = "backward"
            return "backward", self.labels.get(node)
        if self.phase == "backward":
            self.phase = "optimizer"
        module = self.module_stack[-1] if self.module_stack else None
        return self.phase, module if self.phase == "forward" else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "aten":
            return out                          # prim.device, profiler markers: no kernel
        name = func._schema.name.split("::")[1]
        row = self.rows[self.where()]
        returns = func._schema.returns
        if name in UNANNOTATED_VIEWS or (returns and all(
                r.alias_info is not None and not r.alias_info.is_write for r in returns)):
            row["views"] += 1
            return out
        if name in ALLOCATIONS:
            return out
        n = launches(name, args)
        row["kernels"] += n
        self.ops[name] += n
        inputs = tensors_in(list(args) + list((kwargs or {}).values()))
        nbytes = sum(map(unique_bytes, inputs + tensors_in(out)))
        kind = "optimizer" if self.phase == "optimizer" else category(name, inputs, out)
        self.op_bytes[name] += nbytes
        row[kind] += nbytes
        self.check_autocast(func, name, inputs)
        return out

    def check_autocast(self, func, name, inputs):
        """Book an op that CUDA's autocast would cast (to fp32, or promoted) and the CPU's runs
        on its lower-precision inputs: there the model of CUDA's dispatch is wrong."""
        low = torch.get_autocast_dtype("cpu")
        if (self.phase == "forward" and torch.is_autocast_enabled("cpu")
                and name not in LOWER_PRECISION_ON_CUDA
                and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "AutocastCUDA")
                and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "AutocastCPU")
                and any(t.dtype == low for t in inputs)):
            self.autocast_differs[func.name()] += 1


# --------------------------------------------------------------------------------------------------
# One train step, every op booked under its module
# --------------------------------------------------------------------------------------------------
def label_nodes(output, name, labels):
    """Give `name` to the autograd nodes that made `output` and have none yet (those that earlier
    modules, or this module's children, made have theirs)."""
    stack = [t.grad_fn for t in tensors_in(output)]
    while stack:
        node = stack.pop()
        if node is None or node in labels:
            continue
        labels[node] = name
        stack.extend(next_node for next_node, _ in node.next_functions)


@contextlib.contextmanager
def module_tracking(model, counter):
    """Keep counter.module_stack on the module of `model` whose forward runs, and label the
    autograd nodes its forward made with its name."""
    names = {module: name for name, module in model.named_modules()}

    def enter(module, inputs):
        if module in names:
            counter.module_stack.append(names[module])

    def leave(module, inputs, output):
        if module in names:
            counter.module_stack.pop()
            label_nodes(output, names[module], counter.labels)
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_train_step(args):
    """(KernelCounter of the second of two train steps on fake tensors, attention backends that
    step took)."""
    config = dict(latent_shape=(4, 8, 8), embedding_dim=128, n_codes=1024,
                  hidden_dim=args.hidden_dim, heads=args.heads, layers=args.layers, dropout=0.2,
                  attn_dropout=0.3, cond_dim=GPT_COND_DIM)
    backends = Counter()
    with FakeTensorMode(), cuda_dispatch(backends):
        model = GPTPrior(**config).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, betas=stage04.ADAM_BETAS,
                                     fused=True)                 # as 04 on CUDA
        state = Namespace(model=model, optimizer=optimizer,
                          scaler=common.grad_scaler(torch.device("cpu"), args.precision))
        codebook = torch.randn(config["n_codes"], config["embedding_dim"])
        cond, target = torch.randint(0, config["n_codes"],
                                     (2, args.batch_size, *config["latent_shape"]))
        step_args = Namespace(precision=args.precision, grad_clip=1.0)
        for _ in range(2):
            backends.clear()
            counter = KernelCounter({})
            with counter, module_tracking(model, counter):
                stage04.optimizer_step(model, state, codebook, cond, target, 3e-4, step_args)
    return counter, backends


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
GROUPS = [  # (pattern on the module's name, row), the first that matches
    (r"(pre_attn_norm|pre_enc_norm|pre_fc_norm)$|^norm$", "VideoGPT's LayerNorm"),
    (r"\.enc_attn\.attn$", "cross-attention: SDPA"),
    (r"\.enc_attn(\.|$)", "cross-attention: projections, heads"),
    (r"\.attn\.attn$", "self-attention: SDPA"),
    (r"\.attn(\.|$)", "self-attention: projections, heads"),
    (r"\.fc_block\.1$", "MLP: GeLU2"),
    (r"\.fc_block", "MLP: linears"),
    (r"_dp$", "residual dropout"),
    (r"attn_nets\.\d+$", "blocks: residual adds"),
    (r"^(resnet|cond_pos_embd)", "conditioning: resnet, positions"),
    (r"^(fc_in|attn_stack)", "input: fc_in, shift, positions"),
    (r"^fc_out$", "output: fc_out"),
]
ELEMENTWISE = ("elementwise", "cast", "reduction")


def group_of(phase, module):
    if phase == "optimizer":
        return "optimizer: clipping, Adam"
    if module is None:
        return "loss: embeddings, cross-entropy"
    return next((row for pattern, row in GROUPS if re.search(pattern, module)),
                "GPTPrior.forward")


def module_rows(counter):
    """{row of GROUPS: Counter of kernels, kernels by phase, views and bytes by kind}."""
    groups = defaultdict(Counter)
    for (phase, module), row in counter.rows.items():
        group = groups[group_of(phase, module)]
        group.update(row)
        group[f"kernels {phase}"] += row["kernels"]
    groups["total"] = sum(groups.values(), Counter())
    return groups


def print_report(args, counter, backends):
    groups = module_rows(counter)
    mb = 1e6 * args.batch_size                                  # bytes per step -> MB per clip
    print(f"# GPT train step: hidden {args.hidden_dim}, {args.layers} layers, {args.heads} heads, "
          f"batch {args.batch_size}, {args.precision}, CUDA's dispatch modelled, "
          f"torch {torch.__version__}\n")
    print("| module | kernels | of which backward | views | memory-bound MB/clip "
          "| matmul MB/clip | attention MB/clip |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    extra = ["GPTPrior.forward", "loss: embeddings, cross-entropy", "optimizer: clipping, Adam"]
    for name in [row for _, row in GROUPS] + extra + ["total"]:
        g = groups[name]
        if g:
            memory_bound = sum(g[k] for k in ELEMENTWISE + ("optimizer",))
            print(f"| {name} | {g['kernels']:,} | {g['kernels backward']:,} | {g['views']:,} "
                  f"| {memory_bound / mb:,.1f} | {g['matmul'] / mb:,.1f} "
                  f"| {g['attention'] / mb:,.1f} |")
    total = groups["total"]
    print(f"\nkernels per step: {total['kernels']:,} (forward {total['kernels forward']:,}, "
          f"backward {total['kernels backward']:,}, optimizer {total['kernels optimizer']:,}); "
          f"views: {total['views']:,}")
    elementwise = sum(total[k] for k in ELEMENTWISE)
    print(f"bytes per clip: elementwise {elementwise / mb:,.0f} MB (casts {total['cast'] / mb:,.0f}"
          f", reductions {total['reduction'] / mb:,.0f}), matmuls {total['matmul'] / mb:,.0f} MB, "
          f"attention {total['attention'] / mb:,.0f} MB; optimizer "
          f"{total['optimizer'] / 1e6:,.0f} MB per step")
    for (backend, q, v), n in sorted(backends.items()):
        print(f"attention: {n} x {backend} (q {q}, v {v})")
    for op, n in counter.autocast_differs.items():
        print(f"warning: {n} x {op}: CUDA's autocast would cast its inputs, the CPU's does not")
    if args.ops:
        print("\n| op | launches | MB/clip |\n| --- | ---: | ---: |")
        for op, n in counter.ops.most_common(args.ops):
            print(f"| {op} | {n:,} | {counter.op_bytes[op] / mb:,.1f} |")


def main():
    args = parse_args()
    counter, backends = count_train_step(args)
    print_report(args, counter, backends)


if __name__ == "__main__":
    main()
