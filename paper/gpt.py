"""The conditioned GPT prior of the paper (section 2.3.1.2): VideoGPT's transformer reading the codebook
vectors of a clip's codes, predicting each code from those before it (causal self-attention) and
from the clip before (cross-attention to its conditioning features); its loss is eq. 7 (gpt_loss).
The paper's features are the output of one of its layers, PAPER_LAYER.

04_train_gpt.py trains it on cached codes; 05 hooks PAPER_LAYER (or any named module).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Paper section 2.3: the features are the output of the MLP branch of block 4 of the GPT's 8
# (mid-level features; appendix A compares the modules of that block).
# 05 extracts it, 06 and 07 read it.
PAPER_LAYER = "attn_stack.attn_nets.4.post_fc_dp"


# --------------------------------------------------------------------------------------------------
# --- VideoGPT GPT prior with embedding conditioning (paper section 2.3.1.2) ---
# The authors' VideoGPT transformer with "emb_cond": it reads the codebook embeddings of a target
# clip's codes, (t, h, w) = (4, 8, 8) tokens in raster order, predicts each code from the codes
# before it (causal self-attention), and cross-attends to the embeddings of the 16 frames before the
# clip. Module and parameter names are VideoGPT's (wilson1yan/VideoGPT, as modified by the paper's
# authors), so their Lightning checkpoints load with strict key matching and the paper's layer names
# (attn_stack.attn_nets.4.post_fc_dp, Table 4) can be hooked. Differences from their code, all
# numerically equivalent, for speed: fused attention (F.scaled_dot_product_attention, head widths
# padded to fit its kernels) instead of an explicit softmax with a stored causal mask, their
# LayerNorm and GeLU2 through torch's fused kernels (each LayerNorm writing its output in the
# matmuls' dtype under autocast), a tensor that several Linear layers read cast once under
# autocast, and activation checkpointing off by default.
# --------------------------------------------------------------------------------------------------
GPT_COND_DIM = 240   # width of the conditioning features
                     # (the authors' ResidualBlock(embedding_dim, 240))


class _VideoGPTLayerNorm(torch.autograd.Function):
    """GPTLayerNorm's formula through torch's fused LayerNorm kernels. With c = x - mean, r = 1/std
    and s = r + 1e-5, VideoGPT's y = c s g + b is torch's LayerNorm without epsilon, z = c r g,
    scaled per row: y = b + k z with k = s / r. Its gradient for x, with u = dy g,
        s (u - mean(u)) - r^3 c mean(u c),
    is what torch's LayerNorm backward computes, rho (u' - mean(u')) - rho^3 c mean(u' c), from
    u' = alpha dy g and the inverse std rho, when rho alpha = s and rho^3 alpha = r^3:
    alpha = k^1.5, rho = r / sqrt(k). Its gradient for g, sum(alpha dy c rho) = sum(dy c s), is then
    exact too. On CUDA: 5 kernels forward and 6 or 7 backward, where autograd through the formula
    took 9 and 20. y is computed in float32 and written in out_dtype: under autocast the matmuls'
    dtype, the cast they would make of it, in the same kernel (its gradient likewise backward).

    k = 1 + 1e-5 std is close to 1, where float32 holds it to 6e-8, and powers of the rounded k
    would double and triple that error, the same on a whole row: a gradient up to 2.8 times as far
    from the formula's as autograd's, which training amplifies. k, k^1.5 and k^-0.5 are rounded
    once instead: exp(p log1p(1e-5 std)) for the exponents p in `k_powers`."""

    @staticmethod
    def forward(ctx, x, g, b, k_powers, out_dtype):            # (..., D) float32, (D,), (D,), (3,)
        z, mean, rstd = torch.native_layer_norm(x, g.shape, g, None, 0.0)   # mean, rstd: (..., 1)
        powers = torch.special.xlog1py(k_powers, torch.div(1e-5, rstd)).exp()  # (..., 3)
        ctx.save_for_backward(x, g, mean, rstd, powers)
        return torch.addcmul(b, z, powers[..., :1], out=torch.empty_like(z, dtype=out_dtype))

    @staticmethod
    def backward(ctx, dy):                                       # (..., D), out_dtype
        x, g, mean, rstd, powers = ctx.saved_tensors
        alpha, rho = powers[..., 1:2], rstd * powers[..., 2:]    # k^1.5, r k^-0.5: (..., 1)
        dx, dg, _ = torch.ops.aten.native_layer_norm_backward(
            dy * alpha, x, g.shape, mean, rho, g, None, [True, True, False])
        return dx, dg, dy.flatten(0, -2).sum(0, dtype=torch.float32), None, None


class GPTLayerNorm(nn.Module):
    """VideoGPT's LayerNorm over the last axis, in fp32 (as the authors do under mixed precision):
    (x - mean) * (1e-5 + 1 / sqrt(var)) * g + b, with var the mean square of x - mean.

    Not torch's LayerNorm, (x - mean) / sqrt(var + 1e-5): VideoGPT adds its epsilon to the inverse
    standard deviation. The two agree to 1.5e-5 at unit variance but not where the variance is small
    (6.8e-3 relative for the start token, std 0.02; 1.5e-2 at codebook scale), and the authors'
    checkpoints were trained with this formula: their layer attn_stack.attn_nets.4.post_fc_dp then
    matches their own forward pass to float32 rounding. Parameters are named `g` and `b` like
    theirs. Computed by _VideoGPTLayerNorm, a handful of kernels where the formula op by op takes
    thirty (the GPT has 25 of these)."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        # the exponents of k that _VideoGPTLayerNorm needs; not a weight (not in the state dict)
        self.register_buffer("k_powers", torch.tensor([1.0, 1.5, -0.5]), persistent=False)

    def forward(self, x):                                        # (..., dim)
        # Every GPTLayerNorm feeds Linear layers only: under autocast, its output in their dtype
        out_dtype = autocast_dtype(x.device) or x.dtype
        return _VideoGPTLayerNorm.apply(x.float(), self.g, self.b, self.k_powers, out_dtype)


class GeLU2(nn.Module):
    """The GELU approximation x * sigmoid(1.702 x) of VideoGPT's MLP, written silu(1.702 x) / 1.702
    (silu(z) = z sigmoid(z)): on CUDA 3 kernels forward and 3 backward, where the product takes 3
    and 5 (its backward has two branches and a sum)."""

    def forward(self, x):
        return F.silu(1.702 * x) / 1.702


class RightShift(nn.Module):
    """Teacher forcing: shift the flattened tokens one place right and put a learned start token
    `sos` first, so the output at position i depends only on tokens < i."""

    def __init__(self, dim):
        super().__init__()
        self.sos = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, x):                                        # (B, t, h, w, D)
        tokens = x.flatten(1, -2)                                # (B, L, D)
        sos = self.sos.to(x.dtype).expand(len(x), 1, -1)         # (B, 1, D)
        return torch.cat([sos, tokens[:, :-1]], dim=1).view_as(x)


class AddBroadcastPosEmbed(nn.Module):
    """Add a factorised position embedding: one table per axis of `shape` (emb.d_0, d_1, ...), each
    (shape[i], dim / len(shape)), broadcast over the other axes and concatenated on the channels."""

    def __init__(self, shape, dim):
        super().__init__()
        if dim % len(shape):
            raise ValueError(f"embedding width {dim} is not divisible by the {len(shape)} axes "
                             f"{tuple(shape)}")
        self.shape = tuple(shape)
        self.emb = nn.ParameterDict({
            f"d_{i}": nn.Parameter(torch.randn(size, dim // len(shape)) * 0.01)
            for i, size in enumerate(self.shape)})

    def forward(self, x):                                        # (B, *shape, dim)
        n = len(self.shape)
        tables = []
        for i, size in enumerate(self.shape):
            view_shape = [size if j == i else 1 for j in range(n)]
            table = self.emb[f"d_{i}"].view(*view_shape, -1)    # (.., size, .., dim/n)
            tables.append(table.expand(*self.shape, -1))         # (*shape, dim/n)
        return x + torch.cat(tables, dim=-1)                     # (B, *shape, dim)


def _pad_head_width(t):                                          # (..., d) -> (..., 8 ceil(d / 8))
    return F.pad(t, (0, -t.shape[-1] % 8)) if t.shape[-1] % 8 else t


class FullAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over all (t, h, w) positions, causal or not, with dropout on the
    attention weights while training. Its own module so its output, (B, heads, t, h, w, d), can be
    hooked as `...attn.attn` (paper Table 4).

    CUDA's fused kernels take head widths that are multiples of 8 (in bf16 and fp16; flash also
    wants q, k and v equally wide): the cross-attention's value heads, 240 / 4 = 60 wide, would
    take the unfused math path, several times the kernels and memory traffic. Zero channels
    appended to q and k leave q k^T as it is, and appended to v they only add output channels, cut
    off here: so every width is padded at run time (the weights are untouched) and the memory-
    efficient kernel takes the cross-attention."""

    def __init__(self, shape, causal, attn_dropout):
        super().__init__()
        self.shape, self.causal, self.attn_dropout = tuple(shape), causal, attn_dropout

    def forward(self, q, k, v):                                  # (B, heads, L, d) each
        d_k, d_v = q.shape[-1], v.shape[-1]
        out = F.scaled_dot_product_attention(*map(_pad_head_width, (q, k, v)),
                                             dropout_p=self.attn_dropout if self.training else 0.0,
                                             is_causal=self.causal,
                                             scale=1 / math.sqrt(d_k))         # (B, heads, L, d_v')
        return out[..., :d_v].unflatten(2, self.shape)           # (B, heads, t, h, w, d_v)


class GPTAttention(nn.Module):
    """VideoGPT's MultiHeadAttention (full attention): queries from x (width dim_q), keys and values
    from `context` (width dim_kv). As in the authors' code, each head has d_k = dim_q // heads and
    d_v = dim_kv // heads channels (a width the heads do not divide is floored, not rejected)."""

    def __init__(self, shape, dim_q, dim_kv, heads, layers, causal, attn_dropout):
        super().__init__()
        self.heads, self.d_k, self.d_v = heads, dim_q // heads, dim_kv // heads
        if self.d_k < 1 or self.d_v < 1:
            raise ValueError(f"{heads} heads cannot split widths {dim_q} and {dim_kv}")
        self.w_qs = nn.Linear(dim_q, heads * self.d_k, bias=False)
        self.w_ks = nn.Linear(dim_kv, heads * self.d_k, bias=False)
        self.w_vs = nn.Linear(dim_kv, heads * self.d_v, bias=False)
        self.fc = nn.Linear(heads * self.d_v, dim_q, bias=True)
        nn.init.normal_(self.w_qs.weight, std=1.0 / math.sqrt(dim_q))
        nn.init.normal_(self.w_ks.weight, std=1.0 / math.sqrt(dim_kv))
        nn.init.normal_(self.w_vs.weight, std=1.0 / math.sqrt(dim_kv))
        nn.init.normal_(self.fc.weight, std=1.0 / math.sqrt(dim_q * layers))
        self.attn = FullAttention(shape, causal, attn_dropout)

    def forward(self, x, context):                               # (B, t, h, w, dim_q),
                                                                 # (B, t', h', w', dim_kv)
        # (B, ..., heads * d) -> (B, heads, L, d)
        def split_heads(y, d):
            return y.flatten(1, -2).unflatten(-1, (self.heads, d)).transpose(1, 2)
        q = split_heads(self.w_qs(x), self.d_k)
        k = split_heads(self.w_ks(context), self.d_k)
        v = split_heads(self.w_vs(context), self.d_v)
        out = self.attn(q, k, v)                                 # (B, heads, t, h, w, d_v)
        out = out.movedim(1, -2).flatten(-2)                     # (B, t, h, w, heads * d_v)
        return self.fc(out)                                      # (B, t, h, w, dim_q)


def autocast_dtype(device):
    """The dtype autocast casts matmul inputs to on `device`, or None outside autocast."""
    device = device.type                                         # (meta tensors have no autocast)
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_input(x):
    """`x` as autocast would cast it for a matmul (the same `x` outside autocast): once for all the
    Linear layers that read it, where autocast casts it again for each. The forward pass's numbers
    do not change; the readers' gradients are summed in that precision instead of fp32, which leaves
    the gradients' error against fp32 training as it was (benchmarks/README.md)."""
    dtype = autocast_dtype(x.device)
    return x.to(dtype) if dtype is not None and x.dtype == torch.float32 else x


class AttentionBlock(nn.Module):
    """One transformer block: pre-norm causal self-attention, cross-attention to the conditioning
    features, MLP (x4, GeLU2); dropout on each residual branch. Attention-weight dropout applies to
    the self-attention only (the authors' cross-attention has none)."""

    def __init__(self, shape, hidden_dim, heads, layers, dropout, attn_dropout, cond_dim,
                 checkpoint_activations):
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        self.pre_attn_norm = GPTLayerNorm(hidden_dim)
        self.post_attn_dp = nn.Dropout(dropout)
        self.attn = GPTAttention(shape, hidden_dim, hidden_dim, heads, layers, True, attn_dropout)
        self.pre_enc_norm = GPTLayerNorm(hidden_dim)
        self.post_enc_dp = nn.Dropout(dropout)
        self.enc_attn = GPTAttention(shape, hidden_dim, cond_dim, heads, layers, False, 0.0)
        self.pre_fc_norm = GPTLayerNorm(hidden_dim)
        self.post_fc_dp = nn.Dropout(dropout)
        self.fc_block = nn.Sequential(nn.Linear(hidden_dim, 4 * hidden_dim), GeLU2(),
                                      nn.Linear(4 * hidden_dim, hidden_dim))

    def _run(self, module, *inputs):
        # Activation checkpointing (the authors' default) trades a recomputation for memory; off by
        # default because this model fits easily and recomputing costs about a third more time.
        if self.checkpoint_activations and self.training:
            return torch.utils.checkpoint.checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)

    def forward(self, x, cond):                                  # (B, t, h, w, hidden),
                                                                 # (B, t, h, w, cond_dim)
        h = self.pre_attn_norm(x)          # q, k and v read it (in their dtype under autocast)
        x = x + self.post_attn_dp(self._run(self.attn, h, h))
        h = self.pre_enc_norm(x)
        x = x + self.post_enc_dp(self._run(self.enc_attn, h, cond))
        h = self.pre_fc_norm(x)
        return x + self.post_fc_dp(self._run(self.fc_block, h))


class AttentionStack(nn.Module):
    """RightShift, position embedding, then the blocks `attn_nets.0 .. attn_nets.{layers-1}`."""

    def __init__(self, shape, hidden_dim, heads, layers, dropout, attn_dropout, cond_dim,
                 checkpoint_activations):
        super().__init__()
        self.right_shift = RightShift(hidden_dim)
        self.pos_embd = AddBroadcastPosEmbed(shape, hidden_dim)
        self.attn_nets = nn.ModuleList([
            AttentionBlock(shape, hidden_dim, heads, layers, dropout, attn_dropout, cond_dim,
                           checkpoint_activations)
            for _ in range(layers)])

    def forward(self, x, cond):                                  # (B, t, h, w, hidden)
        x = self.pos_embd(self.right_shift(x))
        cond = autocast_input(cond)                              # every block's k and v read it
        for block in self.attn_nets:
            x = block(x, cond)
        return x


class ChannelNormReLU(nn.Module):
    """LayerNorm over the channels of a (B, C, t, h, w) tensor, in fp32, then optionally ReLU (the
    authors' NormReLU with ChannelLayerNorm; parameters under `norm.norm`)."""

    def __init__(self, channels, relu=True):
        super().__init__()
        self.relu = relu
        self.norm = nn.Module()
        self.norm.norm = nn.LayerNorm(channels)

    def forward(self, x):                                        # (B, C, t, h, w)
        y = self.norm.norm(x.float().movedim(1, -1)).movedim(-1, 1).type_as(x)
        return F.relu(y) if self.relu else y


class ConditioningResidualBlock(nn.Module):
    """`resnet`: one residual block from codebook embeddings to the conditioning features, as the
    authors' ResidualBlock(embedding_dim, 240, stride=1, use_projection=True): two 3x3x3
    convolutions without bias and a 1x1x1 projection shortcut, each followed by channel LayerNorm
    (+ ReLU)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.proj_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
        self.proj_bnr = ChannelNormReLU(out_channels, relu=False)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bnr1 = ChannelNormReLU(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bnr2 = ChannelNormReLU(out_channels)

    def forward(self, x):                                        # (B, C_in, t, h, w)
        shortcut = self.proj_bnr(self.proj_conv(x))
        x = self.bnr2(self.conv2(self.bnr1(self.conv1(x))))
        return F.relu(x + shortcut)                              # (B, C_out, t, h, w)


class GPTPrior(nn.Module):
    """The conditioned GPT prior of paper section 2.3.1.2 (the VQ-VAE stays outside: it is frozen);
    VideoGPT calls the whole of it VideoGPT, but the class name is not in the weights' keys.

    forward(x, cond) -> logits (B, t, h, w, n_codes)
        x:    (B, t, h, w, embedding_dim) codebook embeddings of the target clip's codes
        cond: (B, t, h, w, embedding_dim) codebook embeddings of the 16 frames before it
    Defaults are the paper's: hidden 576, 4 heads, 8 layers, dropout 0.2, attention dropout 0.3,
    latent (4, 8, 8), 1024 codes of width 128: 40,324,768 parameters (Table 2(b)).
    """

    def __init__(self, latent_shape=(4, 8, 8), embedding_dim=128, n_codes=1024, hidden_dim=576,
                 heads=4, layers=8, dropout=0.2, attn_dropout=0.3, cond_dim=GPT_COND_DIM,
                 checkpoint_activations=False):
        super().__init__()
        if hidden_dim % len(latent_shape) or cond_dim % len(latent_shape):
            raise ValueError(f"hidden_dim {hidden_dim} and cond_dim {cond_dim} must be multiples "
                             f"of {len(latent_shape)} (one position table per latent axis)")
        self.config = dict(latent_shape=tuple(latent_shape), embedding_dim=embedding_dim,
                           n_codes=n_codes, hidden_dim=hidden_dim, heads=heads, layers=layers,
                           dropout=dropout, attn_dropout=attn_dropout, cond_dim=cond_dim)
        self.resnet = ConditioningResidualBlock(embedding_dim, cond_dim)
        self.cond_pos_embd = AddBroadcastPosEmbed(latent_shape, cond_dim)
        self.fc_in = nn.Linear(embedding_dim, hidden_dim, bias=False)
        nn.init.normal_(self.fc_in.weight, std=0.02)
        self.attn_stack = AttentionStack(latent_shape, hidden_dim, heads, layers, dropout,
                                         attn_dropout, cond_dim, checkpoint_activations)
        self.norm = GPTLayerNorm(hidden_dim)
        self.fc_out = nn.Linear(hidden_dim, n_codes, bias=False)
        nn.init.zeros_(self.fc_out.weight)                       # the authors' choice:
                                                                 # uniform predictions at step 0

    def forward(self, x, cond):
        cond = self.resnet(cond.movedim(-1, 1)).movedim(1, -1)   # (B, t, h, w, cond_dim)
        cond = self.cond_pos_embd(cond)
        h = self.attn_stack(self.fc_in(x), cond)                 # (B, t, h, w, hidden)
        return self.fc_out(self.norm(h))                         # (B, t, h, w, n_codes)


def gpt_loss(model, codebook, cond_codes, target_codes):
    """Paper eq. 7: mean cross-entropy of the target clip's codes (B, t, h, w), each predicted from
    the codes before it (causal attention) and from the conditioning clip's codes (cross-attention).
    The GPT reads codebook vectors, codes (B, t, h, w) -> (B, t, h, w, D),
    as the authors' emb_cond model does."""
    logits = model(F.embedding(target_codes, codebook),
                   F.embedding(cond_codes, codebook))                    # (B, t, h, w, K)
    return F.cross_entropy(logits.flatten(0, -2).float(), target_codes.flatten().long())
