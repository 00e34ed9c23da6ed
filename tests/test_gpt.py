"""Stage 04 and GPTPrior: the conditioned GPT prior (paper 2.3.1.2), its code cache and training."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_stage

import common
import paper.gpt
from paper.gpt import FullAttention, GPTLayerNorm, GPTPrior, PAPER_LAYER, _VideoGPTLayerNorm
from paper.vqvae import VQVAE

gpt_stage = load_stage("04_train_gpt.py")

# Two cores shared with other jobs: one thread per process avoids thread contention (10x slower).
torch.set_num_threads(1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

RES = 16                                    # frame size of the synthetic data; tiny VQ-VAE latent (4, 4, 4)
TINY_VQVAE = dict(resolution=RES, sequence_length=16, n_hiddens=16, n_res_layers=1, downsample=(4, 4, 4),
                  embedding_dim=8, n_codes=32)
TINY_GPT = dict(latent_shape=(4, 4, 4), embedding_dim=8, n_codes=32, hidden_dim=24, heads=2, layers=2, cond_dim=24)
TINY_FLAGS = ["--device", "cpu", "--hidden-dim", "24", "--layers", "2", "--heads", "2", "--cond-dim", "24",
              "--batch-size", "4", "--val-reps", "1"]
N_FRAMES = [300, 260, 300, 200, 300, 300]   # per repetition, manifest order (the last is the validation one)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work dir with frames/manifest.tsv (6 ok repetitions of random 16 px frames, one failed row, one
    in test session 005) and a tiny random VQ-VAE saved as stage 03 saves it."""
    work = tmp_path_factory.mktemp("gptwork")
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(N_FRAMES + [300]):
        ses = "005" if i == len(N_FRAMES) else f"{i // 2 + 1:03d}"
        stem = f"sub-01_ses-{ses}_task-shinobi_run-01_level-1_rep-{i % 2 + 1:02d}"
        frames_path = f"frames/sub-01/ses-{ses}/{stem}.npy"
        (work / frames_path).parent.mkdir(parents=True, exist_ok=True)
        np.save(work / frames_path, rng.integers(0, 256, (n, RES, RES, 3), dtype=np.uint8))
        rows.append(dict(sub="01", ses=ses, task="shinobi", run="01", level="1", rep=f"{i % 2 + 1:02d}",
                         bk2=f"{stem}.bk2", onset_s=1.0, n_frames=n, fps=60, frames_path=frames_path,
                         status="ok", error=""))
    rows.insert(2, dict(rows[0], rep="03", n_frames=None, frames_path=None, status="failed", error="boom"))
    common.write_tsv(work / "frames" / "manifest.tsv", rows)
    torch.manual_seed(0)
    vqvae = VQVAE(**TINY_VQVAE)
    common.save_checkpoint(work / "vqvae" / "ckpt.pt", dict(model=vqvae.state_dict(), model_config=vqvae.config))
    return work


def run04(*args, check=True):
    """04_train_gpt.py as a user runs it (single-threaded, see above)."""
    result = subprocess.run([sys.executable, str(REPO / "04_train_gpt.py"), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, env=SUBPROCESS_ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"04_train_gpt.py exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_log(work, name):
    return pd.read_csv(work / "gpt" / name / "log.csv")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def test_parameter_counts_match_table_2b():
    model = GPTPrior()                      # the paper's configuration is the default
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 40_324_768
    assert round(counts["resnet"] / 1e5) == 24                  # 2.4 M
    assert round(counts["fc_in"] / 1e2) == 737                  # 73.7 K
    assert round(counts["attn_stack"] / 1e5) == 372             # 37.2 M
    assert round(counts["fc_out"] / 1e3) == 590                 # 589.8 K, printed 589 K by Lightning
    assert counts["fc_out"] == 576 * 1024 and counts["fc_in"] == 128 * 576


def test_state_dict_keys_are_the_authors():
    """Names written out from the authors' gpt.py / attention.py / resnet.py (emb_cond), minus the
    derived causal-mask buffers."""
    block = ["pre_attn_norm.g", "pre_attn_norm.b", "attn.w_qs.weight", "attn.w_ks.weight", "attn.w_vs.weight",
             "attn.fc.weight", "attn.fc.bias", "pre_enc_norm.g", "pre_enc_norm.b", "enc_attn.w_qs.weight",
             "enc_attn.w_ks.weight", "enc_attn.w_vs.weight", "enc_attn.fc.weight", "enc_attn.fc.bias",
             "pre_fc_norm.g", "pre_fc_norm.b", "fc_block.0.weight", "fc_block.0.bias", "fc_block.2.weight",
             "fc_block.2.bias"]
    expected = {f"resnet.{m}" for m in ["proj_conv.weight", "conv1.weight", "conv2.weight"]}
    expected |= {f"resnet.{n}.norm.norm.{p}" for n in ["proj_bnr", "bnr1", "bnr2"] for p in ["weight", "bias"]}
    expected |= {f"cond_pos_embd.emb.d_{i}" for i in range(3)} | {f"attn_stack.pos_embd.emb.d_{i}" for i in range(3)}
    expected |= {"fc_in.weight", "attn_stack.right_shift.sos", "norm.g", "norm.b", "fc_out.weight"}
    expected |= {f"attn_stack.attn_nets.{i}.{k}" for i in range(2) for k in block}
    assert set(GPTPrior(**TINY_GPT).state_dict()) == expected


def test_hooks_on_every_block_name_give_table_4_shapes():
    model = GPTPrior().eval()
    table4 = {"pre_attn_norm": 576, "post_attn_dp": 576, "attn.w_qs": 576, "attn.w_ks": 576, "attn.w_vs": 576,
              "attn.fc": 576, "pre_enc_norm": 576, "post_enc_dp": 576, "enc_attn.w_qs": 576, "enc_attn.w_ks": 576,
              "enc_attn.w_vs": 240, "enc_attn.fc": 576, "pre_fc_norm": 576, "post_fc_dp": 576, "fc_block": 576,
              "fc_block.0": 2304, "fc_block.1": 2304, "fc_block.2": 576}
    modules = dict(model.named_modules())
    shapes = {}
    for name in [f"attn_stack.attn_nets.4.{n}" for n in table4] + ["attn_stack.attn_nets.4.attn.attn",
                                                                    "attn_stack.attn_nets.5.enc_attn.attn"]:
        modules[name].register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        model(torch.randn(1, 4, 8, 8, 128), torch.randn(1, 4, 8, 8, 128))
    for name, width in table4.items():
        assert shapes[f"attn_stack.attn_nets.4.{name}"] == (1, 4, 8, 8, width), name
    assert shapes["attn_stack.attn_nets.4.attn.attn"] == (1, 4, 4, 8, 8, 144)
    assert shapes["attn_stack.attn_nets.5.enc_attn.attn"] == (1, 4, 4, 8, 8, 60)


def test_changing_a_later_target_code_never_changes_earlier_logits():
    torch.manual_seed(1)
    model = GPTPrior(**TINY_GPT).eval()
    torch.nn.init.normal_(model.fc_out.weight)           # zero-initialised: every logit would be 0
    codebook = torch.randn(32, 8)
    target = torch.randint(0, 32, (2, 4, 4, 4))
    cond = torch.randint(0, 32, (2, 4, 4, 4))
    with torch.no_grad():
        logits = model(F.embedding(target, codebook), F.embedding(cond, codebook)).flatten(1, 3)  # (B, 64, n)
        for position in [0, 17, 40, 63]:
            changed = target.clone().flatten(1)
            changed[:, position] = (changed[:, position] + 1) % 32
            changed = changed.view_as(target)
            new = model(F.embedding(changed, codebook), F.embedding(cond, codebook)).flatten(1, 3)
            assert torch.equal(new[:, :position + 1], logits[:, :position + 1])   # logit i predicts code i
            if position < 63:
                assert not torch.allclose(new[:, position + 1:], logits[:, position + 1:])


def explicit_attention(q, k, v, causal):
    """The authors' scaled_dot_product_attention: explicit softmax with a lower-triangular mask."""
    attn = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if causal:
        mask = torch.tril(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
        attn = attn.masked_fill(~mask, float("-inf"))
    return F.softmax(attn, dim=-1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d_k, d_v", [(16, 12), (12, 60)])   # widths padded to a multiple of 8
def test_fused_attention_equals_explicit_softmax_in_fp64(causal, d_k, d_v):
    torch.manual_seed(2)
    attention = FullAttention((4, 8, 8), causal=causal, attn_dropout=0.3).eval()
    q, k, v = (torch.randn(2, 4, 256, d, dtype=torch.float64, requires_grad=True) for d in (d_k, d_k, d_v))
    out = attention(q, k, v)                                                       # (B, heads, t, h, w, d)
    expected = explicit_attention(q, k, v, causal).unflatten(2, (4, 8, 8))
    assert out.shape == (2, 4, 4, 8, 8, d_v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad),
                            torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    attention.train()                                   # attention dropout is active while training
    assert not torch.allclose(attention(q, k, v), out)


def authors_layer_norm(x, g, b):
    """VideoGPT's LayerNorm as their code writes it."""
    centered = x - x.mean(-1, keepdim=True)
    return centered * (1e-5 + centered.square().mean(-1, keepdim=True).rsqrt()) * g + b


@pytest.mark.parametrize("scale", [1.0, 0.02, 0.005])   # unit variance; the start token; codebook scale
def test_layer_norm_is_the_authors_formula_not_torchs(scale):
    """Against VideoGPT's formula in float64, (x - mu) * (1e-5 + 1 / sqrt(var)) * g + b, forward and backward
    (ours is torch's fused LayerNorm rescaled, with a backward of its own)."""
    torch.manual_seed(0)
    norm = GPTLayerNorm(576)
    torch.nn.init.normal_(norm.g), torch.nn.init.normal_(norm.b)
    x = (torch.randn(3, 10, 576) * scale + 0.1 * scale).requires_grad_()
    x64, g64, b64 = (t.detach().double().requires_grad_() for t in (x, norm.g, norm.b))
    authors = authors_layer_norm(x64, g64, b64)
    ours = norm(x)
    torch.testing.assert_close(ours.double(), authors, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(ours)
    expected = torch.autograd.grad(authors, (x64, g64, b64), grad.double())
    for name, got, want in zip("xgb", torch.autograd.grad(ours, (x, norm.g, norm.b), grad), expected):
        relative = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert relative < 1e-5, (name, relative)
    # and not torch's LayerNorm, from which it differs most where the variance is small
    torchs = F.layer_norm(x64, (576,), g64, b64, eps=1e-5)
    relative = ((torchs - authors).abs().max() / authors.abs().max()).item()
    assert relative > (1e-3 if scale < 0.1 else 5e-6), relative
    # mixed precision: computed in fp32, returned in the input's dtype
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_layer_norm_gradient_passes_gradcheck():
    """The hand-written backward, checked by finite differences in float64."""
    torch.manual_seed(1)
    x, g, b = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in [(2, 3, 16), (16,), (16,)])
    k_powers = GPTLayerNorm(16).k_powers.double()
    def norm(x, g, b):
        return _VideoGPTLayerNorm.apply(x, g, b, k_powers, torch.float64)
    assert torch.autograd.gradcheck(norm, (0.1 * x.detach().requires_grad_(), g, b))


@pytest.mark.parametrize("scale, shift", [(1.0, 0.3), (0.02, 0.0), (0.005, 0.001), (3.0, 2.0)])
def test_layer_norm_gradient_is_as_accurate_as_autograd_through_the_formula(scale, shift):
    """In float32, the x-gradient's error against the formula's in float64 is within 1.5 times that of
    autograd through the formula in float32 (1.04-1.43 at these scales). Powers of a k = 1 + 1e-5 std
    rounded to float32 (before: k^1.5 and k^-0.5 of the rounded k) made it 1.8-2.8 times at three of
    them: an error the same on a whole row, which training amplified into the demo's losses (1.6e-5)."""
    torch.manual_seed(0)
    norm = GPTLayerNorm(576)
    with torch.no_grad():
        norm.g.normal_(1.0, 0.2), norm.b.normal_(0.0, 0.2)
    x = torch.randn(2048, 576) * scale + shift
    grad = torch.randn_like(x)

    def x_gradient(forward, dtype):
        leaf = x.to(dtype).requires_grad_()
        return torch.autograd.grad(forward(leaf), leaf, grad.to(dtype))[0].double()

    reference = x_gradient(lambda x: authors_layer_norm(x, norm.g.double(), norm.b.double()),
                           torch.float64)
    error = {name: ((got - reference).norm() / reference.norm()).item() for name, got in [
        ("ours", x_gradient(norm, torch.float32)),
        ("autograd", x_gradient(lambda x: authors_layer_norm(x, norm.g, norm.b), torch.float32))]}
    assert error["ours"] < 1.5 * error["autograd"], error


def authors_block_outputs(model, x, cond):
    """The MLP output of every block (post_fc_dp in eval mode) in float64, the blocks written out from the
    authors' code: their LayerNorm, multi-head attention with an explicit softmax (and causal mask), their
    GeLU2 x * sigmoid(1.702 x). x, cond: (B, t, h, w, embedding_dim) codebook vectors. The conditioning and
    input layers before the blocks are the model's own (in float32)."""
    with torch.no_grad():
        cond = model.cond_pos_embd(model.resnet(cond.movedim(-1, 1)).movedim(1, -1)).flatten(1, 3).double()
        x = model.attn_stack.pos_embd(model.attn_stack.right_shift(model.fc_in(x))).flatten(1, 3).double()
    p = {name: t.detach().double() for name, t in model.named_parameters()}
    heads = model.config["heads"]

    def linear(h, name, bias=True):
        return h @ p[f"{name}.weight"].T + (p[f"{name}.bias"] if bias else 0)

    def attention(h, context, name, causal):                                      # (B, L, width) each
        q, k, v = (linear(t, f"{name}.{w}", bias=False).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for t, w in [(h, "w_qs"), (context, "w_ks"), (context, "w_vs")])   # (B, heads, L, d)
        return linear(explicit_attention(q, k, v, causal).transpose(1, 2).flatten(2), f"{name}.fc")

    def norm(h, name):
        return authors_layer_norm(h, p[f"{name}.g"], p[f"{name}.b"])

    outputs = []
    for i in range(model.config["layers"]):
        block = f"attn_stack.attn_nets.{i}"
        h = norm(x, f"{block}.pre_attn_norm")
        x = x + attention(h, h, f"{block}.attn", causal=True)
        x = x + attention(norm(x, f"{block}.pre_enc_norm"), cond, f"{block}.enc_attn", causal=False)
        a = linear(norm(x, f"{block}.pre_fc_norm"), f"{block}.fc_block.0")
        outputs.append(linear(a * torch.sigmoid(1.702 * a), f"{block}.fc_block.2"))
        x = x + outputs[-1]
    return outputs


def test_layer_4_equals_the_authors_forward_pass():
    """The paper's layer (block 4's MLP output) against the authors' blocks written out in float64, at the
    paper's widths of conditioning (240: 60-wide value heads in the cross-attention, padded to 64 for fused
    attention) and narrow q, k heads (48 / 4 = 12, padded to 16), on codebook-scale inputs where VideoGPT's
    LayerNorm is far from torch's."""
    torch.manual_seed(7)
    model = GPTPrior(latent_shape=(4, 8, 8), embedding_dim=16, n_codes=64, hidden_dim=48, heads=4,
                            layers=5, cond_dim=240).eval()
    codebook = 0.05 * torch.randn(64, 16)
    x, cond = (F.embedding(torch.randint(0, 64, (2, 4, 8, 8)), codebook) for _ in range(2))
    outputs = {}
    model.get_submodule(PAPER_LAYER).register_forward_hook(
        lambda module, inputs, output: outputs.__setitem__("ours", output))
    with torch.no_grad():
        model(x, cond)
    ours = outputs["ours"].flatten(1, 3).double()                               # (B, L, hidden)
    theirs = authors_block_outputs(model, x, cond)[4]
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert relative < 1e-5, relative


def test_tiny_config_overfits_a_few_samples():
    torch.manual_seed(3)
    model = GPTPrior(**TINY_GPT, dropout=0.0, attn_dropout=0.0)
    codebook = torch.randn(32, 8)
    cond, target = torch.randint(0, 32, (2, 4, 4, 4, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = gpt_stage.gpt_loss(model, codebook, cond, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - np.log(32)) < 1e-5            # zero-initialised fc_out: uniform predictions
    assert losses[-1] < 0.01 * losses[0]


def test_casting_once_under_autocast_changes_no_number_of_the_forward_pass(monkeypatch):
    """A tensor that several Linear layers read (the self-attention's normalised input, the conditioning) is cast
    once under autocast, where autocast casts it for each reader: the logits are autocast's own, bit for bit."""
    torch.manual_seed(8)
    model = GPTPrior(**TINY_GPT).eval()
    torch.nn.init.normal_(model.fc_out.weight)
    x, cond = torch.randn(2, 2, 4, 4, 4, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        once = model(x, cond)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        other = model(x, cond)                                              # another cast is seen
    monkeypatch.setattr(paper.gpt, "autocast_input", lambda t: t)              # autocast casts for each reader
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        each = model(x, cond)
    assert once.dtype == torch.bfloat16 and torch.equal(once, each)
    assert not torch.equal(other.bfloat16(), once)


def test_compiled_model_gives_the_eager_loss_and_gradients():
    """torch.compile (04's default on CUDA) computes what eager mode does, here with inductor's CPU kernels: the
    loss and every gradient, VideoGPT's LayerNorm (a backward of its own) and padded attention heads included.
    One block, to keep the compilation short (about a minute on 2 busy cores)."""
    torch.manual_seed(9)
    model = GPTPrior(**{**TINY_GPT, "layers": 1, "cond_dim": 12}, dropout=0.0, attn_dropout=0.0)
    torch.nn.init.normal_(model.fc_out.weight)
    codebook = torch.randn(32, 8)
    cond, target = torch.randint(0, 32, (2, 3, 4, 4, 4))
    losses, grads = [], []
    for step_model in (model, torch.compile(model)):
        model.zero_grad()
        losses.append(gpt_stage.gpt_loss(step_model, codebook, cond, target))
        losses[-1].backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_is_the_default_on_cuda_only():
    for flags, on_cpu, on_cuda in [([], False, True), (["--compile"], True, True), (["--no-compile"], False, False)]:
        flag = gpt_stage.parse_args(flags).compile
        assert (common.compiles(flag, torch.device("cpu")), common.compiles(flag, torch.device("cuda"))) == \
            (on_cpu, on_cuda), flags


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_cast_once_and_norms_written_in_the_matmul_dtype_change_no_number_of_a_step(monkeypatch, dtype):
    """04's eager step under autocast casts the Linear and Conv3d weights in one kernel per step
    (with_weights_cast_once), and each VideoGPT LayerNorm writes its output in the matmuls' dtype, where
    autocast cast each weight and each norm's fp32 output on its own: the loss and every gradient are
    autocast's, bit for bit."""
    torch.manual_seed(10)
    model = GPTPrior(**TINY_GPT, dropout=0.0, attn_dropout=0.0)
    torch.nn.init.normal_(model.fc_out.weight)
    codebook = torch.randn(32, 8)
    cond, target = torch.randint(0, 32, (2, 3, 4, 4, 4))

    def step(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            loss = gpt_stage.gpt_loss(forward(), codebook, cond, target)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    loss, grads = step(lambda: gpt_stage.with_weights_cast_once(model, dtype))
    assert loss.dtype == torch.float32 and {g.dtype for g in grads.values()} == {torch.float32}
    fp32_norm = paper.gpt.GPTLayerNorm.forward     # before: a norm's output in fp32, cast (once) after it
    monkeypatch.setattr(paper.gpt.GPTLayerNorm, "forward", lambda self, x: paper.gpt.autocast_input(
        paper.gpt._VideoGPTLayerNorm.apply(x.float(), self.g, self.b, self.k_powers,
                                          torch.float32)))
    reference_loss, reference_grads = step(lambda: model)           # autocast casts every weight
    monkeypatch.setattr(paper.gpt.GPTLayerNorm, "forward", fp32_norm)
    assert torch.equal(loss, reference_loss)
    assert [name for name in grads if not torch.equal(grads[name], reference_grads[name])] == []


def test_step_counter_takes_cudas_attention_backends_and_books_every_op():
    """benchmarks/count_gpt_step.py, which counts the GPT step's CUDA kernels on the CPU: the attention backend
    CUDA takes for the paper's head widths, multi-tensor launches, and a counted step of a small model whose
    kernels all land in a module's row, with no op that CUDA's autocast would cast and the CPU's does not."""
    count = load_stage("benchmarks/count_gpt_step.py")

    def backend(d_v, dtype=torch.bfloat16, dropout=0.0, causal=False, d_qk=144):
        q, v = (torch.empty(2, 256, 4, d, dtype=dtype, requires_grad=True).transpose(1, 2)
                for d in (d_qk, d_v))                                          # (B, heads, L, d), training
        return count.cuda_attention_backend(q, q, v, dropout, causal)
    assert backend(144, dropout=0.3, causal=True) == "flash"             # the self-attention
    assert (backend(60), backend(64)) == ("math", "efficient")           # the cross-attention, padded or not
    assert (backend(60, torch.float32), backend(144, torch.float32)) == ("efficient", "efficient")
    assert (backend(64, d_qk=64), backend(64, d_qk=64, dropout=0.3)) == ("cudnn", "flash")
    ones = [torch.empty(1)] * 111
    assert count.multi_tensor_launches([ones]) == 2 and count.multi_tensor_launches([ones] * 2) == 2
    assert count.multi_tensor_launches([[torch.empty(320 * count.CHUNK + 1)]]) == 2

    step, backends = count.count_train_step(Namespace(batch_size=2, precision="bf16", hidden_dim=48, layers=1,
                                                      heads=4))
    assert sorted(b for b, _, _ in backends) == ["efficient", "flash"]
    rows = count.module_rows(step)
    known = [row for _, row in count.GROUPS] + ["GPTPrior.forward", "loss: embeddings, cross-entropy",
                                                "optimizer: clipping, Adam", "total"]
    assert set(rows) <= set(known) and rows["optimizer: clipping, Adam"]["kernels"] > 0
    assert rows["total"]["kernels"] == sum(row["kernels"] for name, row in rows.items() if name != "total")
    assert rows["VideoGPT's LayerNorm"]["kernels forward"] == 4 * 5                 # 4 calls, 5 kernels each
    assert not step.autocast_differs


# --------------------------------------------------------------------------------------------------
# Data: cached codes, --train-frames
# --------------------------------------------------------------------------------------------------
def test_cached_code_loss_equals_on_the_fly_encoding():
    torch.manual_seed(4)
    vqvae = VQVAE(**TINY_VQVAE).eval()
    model = GPTPrior(**TINY_GPT).eval()
    torch.nn.init.normal_(model.fc_out.weight)
    frames = np.random.default_rng(4).integers(0, 256, (200, RES, RES, 3), dtype=np.uint8)   # 3 clips
    codes = gpt_stage.encode_repetition(vqvae, frames, 4, torch.device("cpu"), batch=2)
    assert codes.shape == (3, 4, 4, 4)
    samples = gpt_stage.CodeSamples([codes.numpy().astype(np.uint16)], [200], 64, "cpu")
    assert len(samples) == 2
    codebook = vqvae.codebook.embeddings
    with torch.no_grad():
        cond, target = samples.batch(torch.arange(2))
        cached = gpt_stage.gpt_loss(model, codebook, cond, target)
        # on the fly, the authors' way: encode both 16-frame clips of each 32-frame window every step
        video = torch.as_tensor(frames[:192:4]).permute(3, 0, 1, 2).float() / 255 - 0.5      # (3, 48, H, W)
        windows = torch.stack([video[:, :32], video[:, 16:]])                               # (2, 3, 32, H, W)
        cond_codes, cond_emb = vqvae.encode(windows[:, :, :16], include_embeddings=True)
        target_codes, target_emb = vqvae.encode(windows[:, :, 16:], include_embeddings=True)
        logits = model(target_emb.movedim(1, -1), cond_emb.movedim(1, -1))
        on_the_fly = F.cross_entropy(logits.movedim(-1, 1), target_codes)
    assert torch.equal(cond_codes, cond.long()) and torch.equal(target_codes, target.long())
    torch.testing.assert_close(cached, on_the_fly, rtol=1e-5, atol=1e-6)


def test_train_frames_selects_exactly_that_many_leading_frames():
    n_frames = [300, 260, 300, 200]
    assert gpt_stage.select_training_frames(n_frames, 0) == n_frames
    assert gpt_stage.select_training_frames(n_frames, 300) == [300, 0, 0, 0]
    assert gpt_stage.select_training_frames(n_frames, 700) == [300, 260, 140, 0]
    assert sum(gpt_stage.select_training_frames(n_frames, 1059)) == 1059
    with pytest.raises(common.InputError, match="--train-frames 1061: the training repetitions hold only 1060"):
        gpt_stage.select_training_frames(n_frames, 1061)
    # samples only read clips whose 64 frames all lie inside the selection: 140 frames -> 2 clips, 1 sample
    codes = [np.arange(n // 64)[:, None, None, None] * np.ones((1, 4, 4, 4), np.uint16) for n in n_frames]
    samples = gpt_stage.CodeSamples(codes, [300, 260, 140, 0], 64, "cpu")
    assert len(samples) == 3 + 3 + 1
    last_clip_read = {int(samples.codes[i + 1, 0, 0, 0]) for i in samples.starts.tolist()}
    assert max(last_clip_read) * 64 + 64 <= 300


def test_subsets_follow_the_authors_order_subject_level_session():
    reps = [dict(sub=sub, ses=ses, level=level, run="01", rep=rep) for sub, ses, level, rep in [
        ("01", "001", "1", "01"), ("01", "001", "4", "02"), ("01", "001", "1", "03"), ("01", "002", "5", "01"),
        ("01", "002", "1", "02"), ("01", "010", "1", "01"), ("02", "001", "1", "01"), ("01", "003", "10", "01")]]
    ordered = [(r["sub"], r["level"], r["ses"], r["rep"]) for r in gpt_stage.in_subset_order(reps, "authors")]
    assert ordered == [("01", "1", "001", "01"), ("01", "1", "001", "03"), ("01", "1", "002", "02"),
                       ("01", "1", "010", "01"), ("01", "4", "001", "02"), ("01", "5", "002", "01"),
                       ("01", "10", "003", "01"), ("02", "1", "001", "01")]   # level 10 after 5: numbers
    assert gpt_stage.in_subset_order(reps, "manifest") == reps


def test_balanced_subsets_give_every_subject_an_equal_share():
    """--subset-order balanced: a data size holds each subject's first frames (authors' order), an equal
    share each, where the authors' order fills the budget with sub-01's gameplay first."""
    n_frames, subjects = [300, 300, 300, 250, 250, 400], ["01", "01", "01", "02", "02", "03"]
    assert gpt_stage.select_training_frames(n_frames, 600) == [300, 300, 0, 0, 0, 0]   # authors: sub-01 only
    assert gpt_stage.select_balanced_frames(n_frames, subjects, 600) == [200, 0, 0, 200, 0, 200]
    assert gpt_stage.select_balanced_frames(n_frames, subjects, 1000) == [300, 34, 0, 250, 83, 333]
    assert gpt_stage.select_balanced_frames(n_frames, subjects, 0) == n_frames
    with pytest.raises(common.InputError, match="sub-03's training repetitions hold only 400 frames, not 434"):
        gpt_stage.select_balanced_frames(n_frames, subjects, 1302)


def test_an_epoch_budget_sets_the_steps_from_the_training_samples(work):
    """--epochs E trains ceil(E x samples / batch size) steps, as the authors' 100-epoch script, and its
    record holds them as --max-steps (the run is the same as one asked for in steps); both at once are
    refused."""
    run04("--work", work, *TINY_FLAGS, "--epochs", "1.5", "--name", "epochs", "--log-every", "5")
    record = common.read_record(work / "gpt" / "epochs" / "ckpt.json")
    span = TINY_VQVAE["sequence_length"] * 4                            # 60 Hz frames of one clip
    samples = sum(n // span - 1 for n in N_FRAMES[:-1])                  # (clip j, clip j + 1) per repetition
    assert record["n_train_samples"] == samples
    assert record["max_steps"] == record["step"] == math.ceil(1.5 * samples / 4)
    assert record["settings"]["--max-steps"] == record["max_steps"] and record["settings"]["--epochs"] == 1.5
    assert read_log(work, "epochs")["epoch"].iloc[-1] == pytest.approx(record["step"] * 4 / samples, rel=1e-5)
    with pytest.raises(common.InputError, match="--epochs 2.0: must be > 0, and is a budget instead of"):
        gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--epochs", "2", "--max-steps", "3"])


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    # 12 samples, a global batch of 4 on 2 processes: 3 steps per epoch, 2 samples per process and step
    seen = torch.cat([gpt_stage.batch_indices(s, 12, 4, 0, r, 2) for s in range(3) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(12))                   # epoch 0: each sample once
    assert torch.equal(gpt_stage.batch_indices(4, 12, 4, 0, 1, 2), gpt_stage.batch_indices(4, 12, 4, 0, 1, 2))
    # --batch-size is global: the 2 processes read together what one process reads alone
    for step in range(5):
        together = torch.cat([gpt_stage.batch_indices(step, 12, 4, 0, r, 2) for r in range(2)])
        assert torch.equal(together, gpt_stage.batch_indices(step, 12, 4, 0))


# --------------------------------------------------------------------------------------------------
# The stage, end to end
# --------------------------------------------------------------------------------------------------
def test_training_resumes_exactly_after_sigterm(work, capsys):
    # a log row every 3 steps: the row after the resume still averages the 3 steps since the previous row
    flags = ["--work", str(work), *TINY_FLAGS, "--max-steps", "40", "--log-every", "3", "--val-every", "21"]
    run04(*flags, "--name", "straight")
    straight = read_log(work, "straight")
    assert (work / "gpt" / "straight" / "loss.png").is_file()
    assert straight["train_loss"].iloc[-1] < straight["train_loss"].iloc[0]
    assert straight["val_loss"].notna().sum() == 2 and np.isfinite(straight["val_loss"].dropna()).all()
    codes_dir = next((work / "gpt" / "codes").iterdir())
    assert len(list(codes_dir.rglob("*.npy"))) == len(N_FRAMES)          # test session 005 not encoded
    subset = common.read_record(work / "gpt" / "straight" / "ckpt.json")["training_repetitions"]
    assert [r["frames_used"] for r in subset] == N_FRAMES[:-1]            # every training repetition, whole

    log_path = work / "gpt" / "cut" / "log.csv"
    process = subprocess.Popen([sys.executable, str(REPO / "04_train_gpt.py"), *map(str, flags), "--name", "cut"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=SUBPROCESS_ENV)
    while process.poll() is None and not (log_path.is_file() and len(log_path.read_text().splitlines()) > 2):
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == common.EXIT_INTERRUPTED, err
    stopped = common.load_checkpoint(work / "gpt" / "cut" / "ckpt.pt")["step"]
    assert 3 <= stopped < 40, "the run ended before SIGTERM arrived: nothing was resumed"
    assert err.strip().splitlines()[-1] == (f"04_train_gpt: interrupted at step {stopped} of 40 by SIGTERM; "
                                            "checkpoint saved: re-run to resume")
    with pytest.raises(common.InputError, match="pass --resume to continue it or --overwrite"):
        gpt_stage.main([*flags, "--name", "cut"])
    run04(*flags, "--name", "cut", "--resume")

    resumed = read_log(work, "cut")
    columns = ["step", "epoch", "lr", "train_loss", "val_loss"]
    assert resumed["step"].tolist() == [*range(3, 40, 3), 40]
    pd.testing.assert_frame_equal(resumed[columns], straight[columns])   # row for row, the averages too
    a = common.load_checkpoint(work / "gpt" / "straight" / "ckpt.pt")["model"]
    b = common.load_checkpoint(work / "gpt" / "cut" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    gpt_stage.main([*flags, "--name", "cut"])                                # complete: skipped
    assert "is complete" in capsys.readouterr().out


def test_two_process_gloo_torchrun(work):
    """--batch-size is the global batch: 2 processes train as one with the same batch (without dropout,
    whose masks are drawn per process, to the rounding of the gradient all-reduce)."""
    flags = ["--work", str(work), *TINY_FLAGS, "--batch-size", "8", "--max-steps", "4", "--log-every", "1",
             "--val-every", "4", "--dropout", "0", "--attn-dropout", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "04_train_gpt.py"), *flags, "--name", "ddp"],
        cwd=REPO, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch 8 per optimizer step = 2 process(es) x 4" in result.stdout
    run04(*flags, "--name", "single")
    ddp, single = read_log(work, "ddp"), read_log(work, "single")
    assert ddp["step"].tolist() == [1, 2, 3, 4]
    # 5 training repetitions of 4, 4, 4, 3, 4 clips: 14 samples; 8 samples per step
    assert ddp["epoch"].iloc[-1] == pytest.approx(4 * 8 / 14, rel=1e-5)
    np.testing.assert_allclose(ddp["train_loss"], single["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(ddp["val_loss"].dropna(), single["val_loss"].dropna(), rtol=1e-5)
    assert common.load_checkpoint(work / "gpt" / "ddp" / "ckpt.pt")["step"] == 4
    uneven = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "04_train_gpt.py"), *flags, "--batch-size", "7", "--name", "uneven"],
        cwd=REPO, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert uneven.returncode != 0
    assert "error: --batch-size 7: does not divide evenly between 2 processes" in uneven.stderr


HOLDER = """import sys, time, common
with common.hold_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_folder_held_by_another_run_is_refused_until_that_run_dies(work, tmp_path):
    """04 on the run folder of a run in progress stops at once, naming the holder (both used to train, and
    log the same steps twice); the kernel frees the folder when the holder dies, even by SIGKILL."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work / "gpt" / "held")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = run04("--work", work, *TINY_FLAGS, "--name", "held", "--vqvae", tmp_path / "none.pt", check=False)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            f"error: {work / 'gpt' / 'held'}: in use by {common.HOST} pid {holder.pid}, another run of this "
            "stage: wait for it to end, or stop it, before running it again"]
    finally:
        holder.kill()
        holder.wait()
    free = run04("--work", work, *TINY_FLAGS, "--name", "held", "--vqvae", tmp_path / "none.pt", check=False)
    assert free.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.pt'}: checkpoint not found"]


def test_authors_lightning_checkpoint_loads_strictly_and_initialises_training(work, tmp_path):
    torch.manual_seed(5)
    theirs = GPTPrior(**TINY_GPT)
    state = {f"vqvae.{k}": v for k, v in VQVAE(**TINY_VQVAE).state_dict().items()}
    state.update(theirs.state_dict())
    for i in range(2):                                   # the authors' FullAttention keeps its causal mask
        state[f"attn_stack.attn_nets.{i}.attn.attn.mask"] = torch.tril(torch.ones(64, 64))
    path = tmp_path / "authors.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000,
                "hyper_parameters": {"args": Namespace(hidden_dim=24, heads=2, layers=2, dropout=0.2,
                                                       attn_dropout=0.3, emb_cond=True, n_cond_frames=0)}}, path)
    config, gpt_state, extra = common.load_gpt_checkpoint(path)
    assert config == {**theirs.config}
    model = common.build_gpt(config, gpt_state, path)    # strict: every key used, none missing
    assert set(extra["vqvae_state"]) == set(VQVAE(**TINY_VQVAE).state_dict())
    x = torch.randn(2, 4, 4, 4, 8)
    assert torch.equal(model.eval()(x, x), theirs.eval()(x, x))

    gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--max-steps", "1", "--lr", "1e-12", "--name", "init",
                    "--init-from", str(path)])
    trained = common.load_checkpoint(work / "gpt" / "init" / "ckpt.pt")["model"]
    assert all(torch.allclose(trained[k], v, atol=1e-6) for k, v in theirs.state_dict().items())
    # and from one of ours: the run just made, into a fresh one
    gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--max-steps", "1", "--lr", "1e-12", "--name", "init2",
                    "--init-from", str(work / "gpt" / "init" / "ckpt.pt")])
    again = common.load_checkpoint(work / "gpt" / "init2" / "ckpt.pt")["model"]
    assert all(torch.allclose(again[k], v, atol=1e-6) for k, v in theirs.state_dict().items())


@pytest.mark.parametrize("flags, message", [
    (["--hidden-dim", "25"], "--hidden-dim 25: must be a positive multiple of 3"),
    (["--train-frames", "5000"], "--train-frames 5000: the training repetitions hold only 1360 frames"),
    (["--vqvae", "missing.pt"], "missing.pt: checkpoint not found"),
    (["--heads", "30"], "--heads 30: must be between 1 and min(--hidden-dim, --cond-dim)"),
])
def test_bad_input_gives_one_line_error(work, flags, message):
    with pytest.raises(common.InputError) as error:
        gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--max-steps", "1", "--name", "bad", *flags])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_truncated_frames_are_named(work, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(work / "frames", copy / "frames")
    shutil.copytree(work / "vqvae", copy / "vqvae")
    frames = copy / "frames/sub-01/ses-002/sub-01_ses-002_task-shinobi_run-01_level-1_rep-01.npy"
    frames.write_bytes(frames.read_bytes()[:3000])
    with pytest.raises(common.InputError) as error:
        gpt_stage.main(["--work", str(copy), *TINY_FLAGS, "--max-steps", "1", "--name", "cut"])
    assert str(error.value).startswith(f"{frames}: truncated (") and "01_render_frames.py" in str(error.value)
    assert not (copy / "gpt/cut/ckpt.pt").exists()


def test_frames_of_another_resolution_are_refused(work, tmp_path):
    vqvae = VQVAE(**{**TINY_VQVAE, "resolution": 32})
    path = tmp_path / "vqvae32.pt"
    common.save_checkpoint(path, dict(model=vqvae.state_dict(), model_config=vqvae.config))
    with pytest.raises(common.InputError) as error:
        gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--vqvae", str(path), "--name", "res"])
    assert "expected uint8 frames (N, 32, 32, 3) for the VQ-VAE's resolution 32, got uint8 (300, 16, 16, 3)" \
        in str(error.value)
    assert str(error.value).startswith(str(work / "frames" / "sub-01" / "ses-001"))


def test_activation_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(6)
    plain = GPTPrior(**TINY_GPT, dropout=0.0, attn_dropout=0.0)
    recomputed = GPTPrior(**TINY_GPT, dropout=0.0, attn_dropout=0.0, checkpoint_activations=True)
    recomputed.load_state_dict(plain.state_dict())
    torch.nn.init.normal_(plain.fc_out.weight), recomputed.fc_out.weight.data.copy_(plain.fc_out.weight)
    codebook = torch.randn(32, 8)
    cond, target = torch.randint(0, 32, (2, 3, 4, 4, 4))
    for model in (plain, recomputed):
        gpt_stage.gpt_loss(model, codebook, cond, target).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_untrained_control_is_the_trained_runs_starting_point(work):
    """--max-steps 0 (07's untrained control) saves the very weights that a run with the same flags starts
    from, so that trained vs untrained differ by the training alone, not by another draw of the init."""
    gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--max-steps", "0", "--name", "untrained", "--seed", "3"])
    untrained = common.load_checkpoint(work / "gpt" / "untrained" / "ckpt.pt")["model"]
    # one Adam step of 1e-12 moves no weight by more than ~1e-12: this is the trained run's step 0
    gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--max-steps", "1", "--lr", "1e-12", "--name", "start",
                    "--seed", "3"])
    start = common.load_checkpoint(work / "gpt" / "start" / "ckpt.pt")["model"]
    assert set(untrained) == set(start)
    assert all(torch.allclose(untrained[k], v, atol=1e-9) for k, v in start.items())
    gpt_stage.main(["--work", str(work), *TINY_FLAGS, "--max-steps", "0", "--name", "other", "--seed", "4"])
    other = common.load_checkpoint(work / "gpt" / "other" / "ckpt.pt")["model"]
    assert not all(torch.equal(untrained[k], v) for k, v in other.items())   # the seed does choose the init


def test_ranks_share_the_code_cache_whatever_the_order_they_look_in(work, tmp_path):
    """Two ranks fill the code cache: rank 1 looks only after rank 0 has written its share. Each rank
    takes the repetitions of its position in the list, not of the missing files, so none is left out."""
    class AtBarrier(Exception):
        pass

    class Collective:   # rank 0 stops at the collective after its share; rank 1 then runs alone
        name = None     # no signal

        def __init__(self):
            self.calls = 0

        def agreed(self, ctx):
            self.calls += 1
            if self.calls == 1:
                raise AtBarrier
            return False
    waiting = Collective()
    reps = common.training_repetitions(work, ["005"])
    digests = [common.file_sha256(work / r["frames_path"]) for r in reps]
    vqvae = VQVAE(**TINY_VQVAE).eval()
    cache, args = tmp_path / "codes", Namespace(frame_step=4)
    with pytest.raises(AtBarrier):
        gpt_stage.cached_codes(work, reps, digests, vqvae, cache, args,
                               common.DistContext(0, 0, 2, torch.device("cpu")), waiting)
    assert len(list(cache.rglob("*.npy"))) == (len(reps) + 1) // 2       # rank 0's share: repetitions 0, 2, ...
    codes = gpt_stage.cached_codes(work, reps, digests, vqvae, cache, args,
                                   common.DistContext(1, 1, 2, torch.device("cpu")), waiting)
    assert len(codes) == len(reps) == len(list(cache.rglob("*.npy")))    # every file there (or a file-not-found)


def test_a_vqvae_that_trained_on_a_gpt_validation_repetition_is_said(work, tmp_path, capsys):
    """03 and 04 hold out the same last repetitions by default. A VQ-VAE trained with fewer held out has
    seen clips of the GPT's validation loss: 04 says which stage to re-run with which flags."""
    vqvae_dir = tmp_path / "vqvae"
    vqvae_dir.mkdir()
    shutil.copy(work / "vqvae" / "ckpt.pt", vqvae_dir / "ckpt.pt")
    flags = ["--work", str(work), "--vqvae", str(vqvae_dir / "ckpt.pt"), *TINY_FLAGS, "--val-reps", "2",
             "--max-steps", "0", "--name", "held-out"]
    for vqvae_val_reps, warned in ((1, True), (2, False), (3, False)):
        common.write_record(vqvae_dir / "ckpt.pt", {"stage": "03_train_vqvae", "settings": {
            "--val-reps": vqvae_val_reps, "--test-sessions": ["005"]}})
        gpt_stage.plan_run(gpt_stage.parse_args(flags))
        out = capsys.readouterr().out
        assert ("trained on 1 of the 2 validation repetitions (its --val-reps 1" in out) is warned, out


def test_one_precision_and_device_chooser_for_03_04_05():
    """--precision auto is bf16 on a GPU and fp32 on the CPU in 03, 04 and 05 alike, and the records
    hold what it resolved to: a run made before auto existed, with the former default fp32 on the CPU,
    is the same run."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [common.resolved_precision(flag, cpu) for flag in ("auto", "fp16", "fp32")] == ["fp32", "fp16", "fp32"]
    assert common.resolved_precision("auto", gpu) == common.GPU_PRECISION == "bf16"
    assert not common.grad_scaler(cpu, "auto").is_enabled() and common.grad_scaler(cpu, "fp16").is_enabled()
    assert common.choose_device("cpu") == cpu and common.choose_device("auto").type in ("cpu", "cuda")
    with pytest.raises(common.InputError, match="--device tpu: not a torch device"):
        common.choose_device("tpu")
    vqvae_stage, extract_stage = load_stage("03_train_vqvae.py"), load_stage("05_extract.py")
    for parse in (vqvae_stage.parse_args, gpt_stage.parse_args):
        assert parse(["--device", "cpu"]).precision == "auto"
    assert extract_stage.choose_device(extract_stage.parse_args(["--ckpt", "x", "--device", "cpu"]))[1] == "fp32"
    assert gpt_stage.precision_of(gpt_stage.parse_args(["--device", "cpu"])) == "fp32"
