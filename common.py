"""What two or more stages share: the paper's networks first, the plumbing after.

| section | what | used by |
| --- | --- | --- |
| VideoGPT VQ-VAE (paper 2.3.1.1) | 3D convolutions, axial attention, the EMA codebook, `VQVAE` | 03, 04, 05 |
| GPT prior (paper 2.3.1.2) | VideoGPT's LayerNorm, attention blocks, conditioning, `GPTPrior` | 04, 05 |
| Loading checkpoints | ours, VideoGPT's and the authors' PyTorch Lightning ones | 04, 05 |
| Errors and exit statuses | `InputError`, `Interrupted`, `run_main` | every stage |
| Atomic writes | `atomic_path`, `save_npy`, `write_json`, `write_tsv` | every stage |
| A folder in use | `hold_folder`: one run at a time writes a training run's folder | 03, 04 |
| Readers | `read_tsv`, `load_npy`, `load_nifti`: a damaged file is named | every stage |
| BIDS names, the split, the frames manifest | `run_stem`, `read_splits`, `training_repetitions` | 01-06 |
| Provenance | records, fingerprints, `is_up_to_date`, `stale_input` | every stage |
| CPU threads | `available_cpus`, `limit_threads`: the job's CPUs, one thread pool per process | 01-05 |
| Training plumbing | DDP, preemption, run flags, checkpoints, schedule, precision | 03, 04 |

The paper's training and encoding algorithms live in the numbered stage scripts.
"""
import contextlib
import csv
import fcntl
import gc
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import sys
import types
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# The stage scripts start with a digit, so they cannot be imported by name; tests load them with
# importlib. Everything here is importable as `import common`.

DEFAULT_WORK = "work"
# CNeuroMod convention: a bk2 holds one input per 60 Hz emulator step, and stage 01 renders every
# step (the Genesis really runs at 59.92 Hz; the data treat it as 60).
GAMEPLAY_HZ = 60
# Paper section 2.3: the features are the output of the MLP branch of block 4 of the GPT's 8
# (mid-level features; appendix A compares the modules of that block).
# 05 extracts it, 06 and 07 read it.
PAPER_LAYER = "attn_stack.attn_nets.4.post_fc_dp"


# --------------------------------------------------------------------------------------------------
# --- VideoGPT VQ-VAE (paper section 2.3.1.1) ---
# The authors' model (VideoGPT, Yan et al. 2021), with VideoGPT's module and parameter names so that
# its checkpoints and the authors' load with strict key matching. Videos are (B, C, T, H, W) floats
# in [-0.5, 0.5]; latents are (B, embedding_dim, t, h, w) with (t, h, w) = (T, H, W) / downsample.
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exact_fp32(device_type):
    """Float32 math without shortcuts inside the block: autocast off, and no TF32 in cuDNN
    convolutions or CUDA matmuls. The caller's settings come back afterwards."""
    cudnn = torch.backends.cudnn
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False), cudnn.flags(
                enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def video_from_uint8(frames):
    """uint8 frames (B, T, H, W, 3) -> the VQ-VAE's input video (B, 3, T, H, W), float in
    [-0.5, 0.5] (VideoGPT's scaling), computed where `frames` is:
    send the uint8 batch to the GPU, 4x smaller."""
    return frames.permute(0, 4, 1, 2, 3).float() / 255.0 - 0.5


# The paper's model (checked against Table 2(a)'s parameter counts; Table 2(c) misprints it).
VQVAE_PAPER_CONFIG = dict(resolution=128, sequence_length=16, n_hiddens=240, n_res_layers=4,
                          downsample=(4, 16, 16), embedding_dim=128, n_codes=1024)


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


class SamePadConv3d(nn.Module):
    """Conv3d with 'same' padding: output size = input size / stride on each axis (T, H, W).

    VideoGPT pads k - s in total per axis, the odd element in front. Symmetric padding goes into the
    convolution itself (no padded copy of the input); only the odd element is padded explicitly.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        kernel, stride = _triple(kernel_size), _triple(stride)
        total = [k - s for k, s in zip(kernel, stride)]
        both_sides = tuple(p // 2 for p in total)                  # (T, H, W)
        self.extra_front = tuple(p % 2 for p in total)             # (T, H, W)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=both_sides,
                              bias=bias)

    def forward(self, x):                                          # (B, C, T, H, W)
        if any(self.extra_front):
            t, h, w = self.extra_front
            x = F.pad(x, (w, 0, h, 0, t, 0))                       # F.pad lists the last axis first
        return self.conv(x)


class SamePadConvTranspose3d(nn.Module):
    """ConvTranspose3d that multiplies each axis by its stride
    (the decoder's mirror of SamePadConv3d).

    VideoGPT pads the input like SamePadConv3d and crops k - 1 on each side of the output. Zero
    input padding only shifts the output, so this equals cropping (k - 1) - pad * s: when both sides
    crop the same amount on every axis (kernel 4, stride 2) the convolution's own `padding` does it
    without a padded copy; otherwise (stride 1 axes) VideoGPT's form is used as is.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        kernel, stride = _triple(kernel_size), _triple(stride)
        total = [k - s for k, s in zip(kernel, stride)]
        front = [p // 2 + p % 2 for p in total]
        back = [p // 2 for p in total]
        crop_front = [k - 1 - p * s for k, p, s in zip(kernel, front, stride)]
        crop_back = [k - 1 - p * s for k, p, s in zip(kernel, back, stride)]
        if crop_front == crop_back and min(crop_front) >= 0:
            self.pad_input = None
            padding = tuple(crop_front)
        else:
            self.pad_input = (front[2], back[2], front[1], back[1], front[0], back[0])
            padding = tuple(k - 1 for k in kernel)
        self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel, stride=stride, bias=bias,
                                        padding=padding)

    def forward(self, x):                                          # (B, C, T, H, W)
        if self.pad_input is not None:
            x = F.pad(x, self.pad_input)
        return self.convt(x)


class AxialAttention(nn.Module):
    """Non-causal multi-head self-attention along one axis of a (B, T, H, W, C) tensor (axial
    attention; VideoGPT calls it MultiHeadAttention, like the GPT's:
    class names are not in the weights' keys).

    axial_dim: 1 (time), 2 (height) or 3 (width). Parameter names and initialisation are VideoGPT's.
    """

    def __init__(self, dim, n_head, axial_dim, n_layer=1):
        super().__init__()
        self.n_head = n_head
        self.axial_dim = axial_dim
        self.w_qs = nn.Linear(dim, dim, bias=False)
        self.w_ks = nn.Linear(dim, dim, bias=False)
        self.w_vs = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, dim, bias=True)
        for w in (self.w_qs, self.w_ks, self.w_vs):
            nn.init.normal_(w.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.fc.weight, std=1.0 / math.sqrt(dim * n_layer))

    def forward(self, x):                                          # (B, T, H, W, C)
        moved_shape = x.movedim(self.axial_dim, -2).shape          # (B, ., ., L, C):
                                                                   # L = attended axis

        # (B, T, H, W, C) -> (N, heads, L, d)
        def heads(t):
            t = t.movedim(self.axial_dim, -2)                      # (B, ., ., L, C)
            return t.reshape(-1, t.shape[-2], self.n_head,
                             t.shape[-1] // self.n_head).transpose(1, 2)
        q, k, v = heads(self.w_qs(x)), heads(self.w_ks(x)), heads(self.w_vs(x))
        out = F.scaled_dot_product_attention(q, k, v)              # softmax(q k^T / sqrt(d)) v
        out = out.transpose(1, 2).reshape(moved_shape)             # (B, ., ., L, C)
        return self.fc(out.movedim(-2, self.axial_dim))            # (B, T, H, W, C)


class AxialBlock(nn.Module):
    """Sum of self-attentions along width, height and time
    (paper 2.3.1.1, 'combined axial attention')."""

    def __init__(self, n_hiddens, n_head):
        super().__init__()
        self.attn_w = AxialAttention(n_hiddens, n_head, axial_dim=3)
        self.attn_h = AxialAttention(n_hiddens, n_head, axial_dim=2)
        self.attn_t = AxialAttention(n_hiddens, n_head, axial_dim=1)

    def forward(self, x):                                          # (B, C, T, H, W)
        x = x.movedim(1, -1)                                       # (B, T, H, W, C)
        x = self.attn_w(x) + self.attn_h(x) + self.attn_t(x)
        return x.movedim(-1, 1)                                    # (B, C, T, H, W)


class AttentionResidualBlock(nn.Module):
    """x + [BN-ReLU-conv3 (to n/2), BN-ReLU-conv1 (back to n), BN-ReLU,
    axial attention (2 heads)](x)."""

    def __init__(self, n_hiddens):
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm3d(n_hiddens), nn.ReLU(),
            SamePadConv3d(n_hiddens, n_hiddens // 2, 3, bias=False),
            nn.BatchNorm3d(n_hiddens // 2), nn.ReLU(),
            SamePadConv3d(n_hiddens // 2, n_hiddens, 1, bias=False),
            nn.BatchNorm3d(n_hiddens), nn.ReLU(),
            AxialBlock(n_hiddens, 2),
        )

    def forward(self, x):                                          # (B, C, T, H, W)
        return x + self.block(x)


# VideoGPT's constants of the VQ-VAE's training, which the paper's experiments never change:
EMA_EPSILON = 1e-7     # Laplace smoothing of the codebook's EMA counts (eq. 6):
                       # an unused code keeps a size
RESTART_BELOW = 1.0    # a code whose EMA count falls below this restarts
                       # from a random encoder output
DATA_VARIANCE = 0.06   # the reconstruction MSE of eq. 1 is divided by it (VideoGPT's normalisation)


class Codebook(nn.Module):
    """Vector quantiser with an EMA codebook (paper eqs. 3-6; van den Oord et al. 2017).

    Buffers (VideoGPT's names): embeddings (n_codes, D), N (n_codes,) EMA counts, z_avg (n_codes, D)
    EMA sums. In training mode each forward updates them from the batch; the counts and sums are
    summed over DDP ranks, so every rank keeps the same codebook.
    Distances and EMA run in fp32 under autocast.
    """

    def __init__(self, n_codes, embedding_dim, decay=0.99, epsilon=EMA_EPSILON,
                 restart_below=RESTART_BELOW, beta=0.25):
        super().__init__()
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())
        self.n_codes, self.embedding_dim = n_codes, embedding_dim
        self.decay, self.epsilon, self.restart_below, self.beta = decay, epsilon, restart_below, beta
        self._need_init = True    # the first training batch initialises the codebook

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._need_init = False   # a loaded codebook is trained: never re-initialise it

    def _random_vectors(self, flat):
        """n_codes rows drawn from the encoder outputs `flat` (M, D), the same on every rank
        (rank 0's). With fewer than n_codes outputs they are repeated with a little noise
        (VideoGPT's _tile)."""
        m, d = flat.shape
        if m < self.n_codes:
            flat = flat.repeat((self.n_codes + m - 1) // m, 1)
            flat = flat + torch.randn_like(flat) * (0.01 / math.sqrt(d))
        chosen = flat[torch.randperm(flat.shape[0], device=flat.device)[:self.n_codes]].contiguous()
        if dist.is_initialized():
            dist.broadcast(chosen, 0)
        return chosen                                              # (n_codes, D)

    @torch.no_grad()
    def _init_embeddings(self, flat):
        chosen = self._random_vectors(flat)
        self.embeddings.copy_(chosen)
        self.z_avg.copy_(chosen)
        self.N.fill_(1.0)
        self._need_init = False

    @torch.no_grad()
    def _ema_update(self, flat, onehot):
        """Paper eqs. 3-6, then the restart of codes whose EMA count fell below 1."""
        n_total = onehot.sum(0)                                    # (n_codes,)
        encode_sum = onehot.t() @ flat                             # (n_codes, D)
        if dist.is_initialized():
            dist.all_reduce(n_total)
            dist.all_reduce(encode_sum)
        self.N.mul_(self.decay).add_(n_total, alpha=1 - self.decay)
        self.z_avg.mul_(self.decay).add_(encode_sum, alpha=1 - self.decay)
        n = self.N.sum()
        # Laplace smoothing
        weights = (self.N + self.epsilon) / (n + self.n_codes * self.epsilon) * n
        self.embeddings.copy_(self.z_avg / weights.unsqueeze(1))
        alive = (self.N >= self.restart_below).unsqueeze(1)        # (n_codes, 1)
        self.embeddings.copy_(torch.where(alive, self.embeddings, self._random_vectors(flat)))

    def forward(self, z):
        """z: (B, D, t, h, w) encoder outputs. Returns a dict: embeddings (B, D, t, h, w) quantised
        with a straight-through gradient, encodings (B, t, h, w) long codes,
        commitment_loss, perplexity."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = z.movedim(1, -1).reshape(-1, self.embedding_dim)       # (B*t*h*w, D)
            if self._need_init and self.training:
                self._init_embeddings(flat.detach())
            distances = ((flat ** 2).sum(1, keepdim=True) - 2 * flat @ self.embeddings.t()
                         + (self.embeddings ** 2).sum(1).unsqueeze(0))    # (B*t*h*w, n_codes)
            codes = distances.argmin(1)                                    # (B*t*h*w,)
            quantized = F.embedding(codes, self.embeddings)                # (B*t*h*w, D),
                                                                           # before update
            onehot = F.one_hot(codes, self.n_codes).float()                # (B*t*h*w, n_codes)
            avg_probs = onehot.mean(0)
            perplexity = torch.exp(-(avg_probs * torch.log(avg_probs + 1e-10)).sum())
            if self.training:
                self._ema_update(flat.detach(), onehot)
            # (B, D, t, h, w)
            quantized = quantized.view(z.shape[0], *z.shape[2:], -1).movedim(-1, 1)
            commitment_loss = self.beta * F.mse_loss(z, quantized.detach())  # paper eq. 1
            # straight-through estimator
            embeddings_st = z + (quantized - z).detach()
        return dict(embeddings=embeddings_st, encodings=codes.view(z.shape[0], *z.shape[2:]),
                    commitment_loss=commitment_loss, perplexity=perplexity)

    def dictionary_lookup(self, encodings):
        """Codes (B, t, h, w) long -> their vectors (B, t, h, w, D) (VideoGPT's layout)."""
        return F.embedding(encodings, self.embeddings)


def _res_stack(n_hiddens, n_res_layers):
    return nn.Sequential(*[AttentionResidualBlock(n_hiddens) for _ in range(n_res_layers)],
                         nn.BatchNorm3d(n_hiddens), nn.ReLU())


class Encoder(nn.Module):
    """Strided convs (kernel 4, stride 2 on each axis still to halve), a kernel-3 conv, then the
    attention residual blocks and a final BN-ReLU. (B, 3, T, H, W) -> (B, n_hiddens, t, h, w)."""

    def __init__(self, n_hiddens, n_res_layers, downsample):
        super().__init__()
        halvings = [int(math.log2(d)) for d in downsample]        # per axis (T, H, W)
        self.convs = nn.ModuleList()
        for i in range(max(halvings)):
            stride = tuple(2 if n > i else 1 for n in halvings)
            self.convs.append(SamePadConv3d(3 if i == 0 else n_hiddens, n_hiddens, 4,
                                            stride=stride))
        self.conv_last = SamePadConv3d(n_hiddens if len(self.convs) else 3, n_hiddens,
                                       kernel_size=3)
        self.res_stack = _res_stack(n_hiddens, n_res_layers)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.res_stack(self.conv_last(x))


class Decoder(nn.Module):
    """The encoder's mirror: attention residual blocks, then transposed convs (kernel 4, stride 2 on
    each axis still to double; ReLU between them). (B, n_hiddens, t, h, w) -> (B, 3, T, H, W)."""

    def __init__(self, n_hiddens, n_res_layers, upsample):
        super().__init__()
        self.res_stack = _res_stack(n_hiddens, n_res_layers)
        doublings = [int(math.log2(d)) for d in upsample]
        n_convs = max(doublings)
        self.convts = nn.ModuleList()
        for i in range(n_convs):
            stride = tuple(2 if n > i else 1 for n in doublings)
            out_channels = 3 if i == n_convs - 1 else n_hiddens
            self.convts.append(SamePadConvTranspose3d(n_hiddens, out_channels, 4, stride=stride))

    def forward(self, x):
        x = self.res_stack(x)
        for i, convt in enumerate(self.convts):
            x = convt(x)
            if i < len(self.convts) - 1:
                x = F.relu(x)
        return x


class VQVAE(nn.Module):
    """VideoGPT's VQ-VAE: encoder, pre_vq_conv, codebook, post_vq_conv, decoder (paper 2.3.1.1).

    Input clips x: (B, 3, sequence_length, resolution, resolution) in [-0.5, 0.5]. The keywords
    before * are the architecture of Table 2; `config` holds them (checkpoints store it to rebuild
    the model). Those after * only shape training (VideoGPT's values by default): the commitment
    weight beta (paper eq. 1), the codebook EMA's decay (eqs. 3-4), and the constants above.
    """

    def __init__(self, resolution=128, sequence_length=16, n_hiddens=240, n_res_layers=4,
                 downsample=(4, 16, 16), embedding_dim=128, n_codes=1024, *, beta=0.25,
                 ema_decay=0.99, ema_epsilon=EMA_EPSILON, restart_below=RESTART_BELOW,
                 data_variance=DATA_VARIANCE):
        super().__init__()
        downsample = tuple(int(d) for d in downsample)
        self.config = dict(resolution=resolution, sequence_length=sequence_length,
                           n_hiddens=n_hiddens, n_res_layers=n_res_layers, downsample=downsample,
                           embedding_dim=embedding_dim, n_codes=n_codes)
        self.embedding_dim, self.n_codes = embedding_dim, n_codes
        self.encoder = Encoder(n_hiddens, n_res_layers, downsample)
        self.decoder = Decoder(n_hiddens, n_res_layers, downsample)
        self.pre_vq_conv = SamePadConv3d(n_hiddens, embedding_dim, 1)
        self.post_vq_conv = SamePadConv3d(embedding_dim, n_hiddens, 1)
        self.codebook = Codebook(n_codes, embedding_dim, ema_decay, ema_epsilon, restart_below,
                                 beta)
        self.data_variance = data_variance

    @property
    def latent_shape(self):
        """(t, h, w) of the code grid of one clip."""
        size = (self.config["sequence_length"], self.config["resolution"],
                self.config["resolution"])
        return tuple(s // d for s, d in zip(size, self.config["downsample"]))

    def encode(self, x, include_embeddings=False):
        """x (B, 3, T, H, W) -> codes (B, t, h, w) long [, embeddings (B, D, t, h, w)].

        Always in full float32, whatever autocast or TF32 setting the caller runs under: 04 trains
        the GPT on these codes and 05 reads the brain's features from them, and lower precision can
        pick another code where two are nearly tied (bf16 flipped 15% of a tiny model's codes).
        PyTorch runs cuDNN convolutions in TF32 by default on Ampere and later,
        so that is switched off here too."""
        with exact_fp32(x.device.type):
            vq_output = self.codebook(self.pre_vq_conv(self.encoder(x)))
        if include_embeddings:
            return vq_output["encodings"], vq_output["embeddings"]
        return vq_output["encodings"]

    def decode(self, encodings):
        """codes (B, t, h, w) long -> reconstructed clips (B, 3, T, H, W)."""
        h = self.codebook.dictionary_lookup(encodings).movedim(-1, 1)     # (B, D, t, h, w)
        return self.decoder(self.post_vq_conv(h))

    def forward(self, x):
        """Returns (recon_loss, x_recon, vq_output) as VideoGPT; the training loss is
        recon_loss + vq_output['commitment_loss'] (paper eq. 1, beta x commitment; the EMA replaces
        the codebook term). recon_loss = MSE / data_variance
        (DATA_VARIANCE: VideoGPT's normalisation)."""
        vq_output = self.codebook(self.pre_vq_conv(self.encoder(x)))
        x_recon = self.decoder(self.post_vq_conv(vq_output["embeddings"]))
        recon_loss = F.mse_loss(x_recon.float(), x.float()) / self.data_variance
        return recon_loss, x_recon, vq_output


# --------------------------------------------------------------------------------------------------
# --- VideoGPT GPT prior with embedding conditioning (paper section 2.3.1.2) ---
# The authors' VideoGPT transformer with "emb_cond": it reads the codebook embeddings of a target
# clip's codes, (t, h, w) = (4, 8, 8) tokens in raster order, predicts each code from the codes
# before it (causal self-attention), and cross-attends to the embeddings of the 16 frames before the
# clip. Module and parameter names are VideoGPT's (wilson1yan/VideoGPT, as modified by the paper's
# authors), so their Lightning checkpoints load with strict key matching and the paper's layer names
# (attn_stack.attn_nets.4.post_fc_dp, Table 4) can be hooked. Differences from their code, all
# numerically equivalent: fused attention (F.scaled_dot_product_attention) instead of an explicit
# softmax with a stored causal mask, and activation checkpointing off by default.
# --------------------------------------------------------------------------------------------------
GPT_COND_DIM = 240   # width of the conditioning features
                     # (the authors' ResidualBlock(embedding_dim, 240))


class GPTLayerNorm(nn.Module):
    """VideoGPT's LayerNorm over the last axis, in fp32 (as the authors do under mixed precision):
    (x - mean) * (1e-5 + 1 / sqrt(var)) * g + b, with var the mean square of x - mean.

    Not torch's LayerNorm, (x - mean) / sqrt(var + 1e-5): VideoGPT adds its epsilon to the inverse
    standard deviation. The two agree to 1.5e-5 at unit variance but not where the variance is small
    (6.8e-3 relative for the start token, std 0.02; 1.5e-2 at codebook scale), and the authors'
    checkpoints were trained with this formula: their layer attn_stack.attn_nets.4.post_fc_dp then
    matches their own forward pass to float32 rounding. Parameters are named `g` and `b` like
    theirs."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x):                                        # (..., dim)
        x_float = x.float()
        centered = x_float - x_float.mean(dim=-1, keepdim=True)
        variance = centered.square().mean(dim=-1, keepdim=True)  # (..., 1), biased as VideoGPT's
        return (centered * (1e-5 + variance.rsqrt()) * self.g + self.b).type_as(x)


class GeLU2(nn.Module):
    """The GELU approximation x * sigmoid(1.702 x) of VideoGPT's MLP."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


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


class FullAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over all (t, h, w) positions, causal or not, with dropout on the
    attention weights while training. Its own module so its output, (B, heads, t, h, w, d), can be
    hooked as `...attn.attn` (paper Table 4)."""

    def __init__(self, shape, causal, attn_dropout):
        super().__init__()
        self.shape, self.causal, self.attn_dropout = tuple(shape), causal, attn_dropout

    def forward(self, q, k, v):                                  # (B, heads, L, d) each
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.attn_dropout if self.training else 0.0,
                                             is_causal=self.causal)             # (B, heads, L, d_v)
        return out.unflatten(2, self.shape)                      # (B, heads, t, h, w, d_v)


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
        h = self.pre_attn_norm(x)
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


# --------------------------------------------------------------------------------------------------
# --- Loading checkpoints: ours, VideoGPT's and the authors' PyTorch Lightning ones ---
# Ours hold `model` + `model_config`; a Lightning checkpoint holds `state_dict` +
# `hyper_parameters`, from which the architecture is read (sizes from the tensors' shapes). Every
# load is strict: a key that is missing or left over is a one-line error naming the file.
# --------------------------------------------------------------------------------------------------
class _StubObject(dict):
    """Stands in for a class that cannot be imported while unpickling (e.g. pytorch_lightning's
    callbacks inside an authors' checkpoint): we only need the tensors and hyperparameters. It is a
    dict so that dict subclasses (Lightning's AttributeDict of hyper_parameters) keep their
    items."""

    def __init__(self, *args, **kwargs):
        if args and isinstance(args[0], dict):
            super().__init__(args[0])

    def __setstate__(self, state):
        pass


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StubObject,), {"__module__": module})


_tolerant_pickle = types.ModuleType("tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler
_tolerant_pickle.load = lambda file, **kwargs: _TolerantUnpickler(file, **kwargs).load()
_tolerant_pickle.loads = lambda data, **kwargs: _TolerantUnpickler(io.BytesIO(data),
                                                                   **kwargs).load()


def load_checkpoint(path, map_location="cpu"):
    """torch.load a checkpoint we wrote or a PyTorch Lightning one (its pytorch_lightning objects
    are replaced by stubs when pytorch_lightning is not installed). Fails with one line on a bad
    file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (ModuleNotFoundError, AttributeError):
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=_tolerant_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a readable torch checkpoint ({first})") from None


def load_weights(model, state, path, what):
    """model.load_state_dict(state) with strict key matching;
    a mismatch is an InputError naming `path`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise InputError(f"{path}: weights do not fit {what} ({detail})") from None
    return model


def _vqvae_config_from_lightning(state, hparams, path, gpt_state=None):
    """The VQVAE keywords of an authors' Lightning checkpoint: sizes from the weights' shapes, the
    rest from its hyper_parameters (resolution, sequence_length, and downsample for a VQ-VAE; for a
    GPT, downsample = clip shape / latent shape, read from the GPT's position embeddings
    `gpt_state`)."""
    args = hparams.get("args", hparams) if isinstance(hparams, dict) else hparams
    args = vars(args) if isinstance(args, Namespace) else dict(args or {})
    try:
        n_codes, embedding_dim = state["codebook.embeddings"].shape
        n_hiddens = state["encoder.conv_last.conv.weight"].shape[0]
    except KeyError as err:
        raise InputError(f"{path}: no VQ-VAE weights (missing {err.args[0]})") from None
    n_res_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.res_stack.")
                        and ".block." in k})
    config = dict(n_hiddens=n_hiddens, n_res_layers=n_res_layers, embedding_dim=embedding_dim,
                  n_codes=n_codes, resolution=args.get("resolution", 128),
                  sequence_length=args.get("sequence_length", 16))
    if "downsample" in args and "n_codes" in args:                        # a VQ-VAE's own args
        config["downsample"] = tuple(args["downsample"])
    elif gpt_state is not None and "attn_stack.pos_embd.emb.d_0" in gpt_state:
        latent = [gpt_state[f"attn_stack.pos_embd.emb.d_{i}"].shape[0]
                  for i in range(3)]                                      # (t, h, w)
        size = (config["sequence_length"], config["resolution"], config["resolution"])
        config["downsample"] = tuple(s // t for s, t in zip(size, latent))
    else:
        raise InputError(f"{path}: cannot tell the VQ-VAE's downsample factors from the checkpoint")
    return config


def load_vqvae(path, map_location="cpu", allow_unfinished=False):
    """A VQVAE in eval mode from (a) a stage-03 checkpoint (`model` + `model_config`), (b) a
    VideoGPT / authors' Lightning VQ-VAE checkpoint (`state_dict` + `hyper_parameters`), or (c) an
    authors' Lightning GPT checkpoint, which holds its VQ-VAE under the prefix `vqvae.`. Keys match
    strictly. A stage-03 run that was interrupted is refused unless allow_unfinished
    (flag --allow-unfinished)."""
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: not a VQ-VAE checkpoint (a {type(ckpt).__name__}, not a dict)")
    require_complete(ckpt, path, "03_train_vqvae.py", "--allow-unfinished", allow_unfinished)
    if "model" in ckpt and "model_config" in ckpt:
        config, state = ckpt["model_config"], ckpt["model"]
    elif "state_dict" in ckpt:
        state = ckpt["state_dict"]
        gpt_state = None
        if any(k.startswith("vqvae.") for k in state):
            gpt_state = state
            state = {k[len("vqvae."):]: v for k, v in state.items() if k.startswith("vqvae.")}
        config = _vqvae_config_from_lightning(state, ckpt.get("hyper_parameters") or {}, path,
                                              gpt_state)
    else:
        raise InputError(f"{path}: not a VQ-VAE checkpoint "
                         "(neither model + model_config nor state_dict)")
    return load_weights(VQVAE(**config), state, path, f"a VQ-VAE with {config}").eval()


def gpt_config_from_state(state, heads, dropout=0.2, attn_dropout=0.3):
    """GPTPrior(**config) arguments for a GPT state dict: widths, depth and latent shape are read
    from the weights; the number of heads and the dropouts are not in the weights,
    so they are given."""
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("attn_stack.attn_nets."))
    n_axes = sum(k.startswith("attn_stack.pos_embd.emb.") for k in state)
    latent_shape = tuple(state[f"attn_stack.pos_embd.emb.d_{i}"].shape[0] for i in range(n_axes))
    hidden_dim, embedding_dim = state["fc_in.weight"].shape
    return dict(latent_shape=latent_shape, embedding_dim=embedding_dim,
                n_codes=state["fc_out.weight"].shape[0], hidden_dim=hidden_dim, heads=heads,
                layers=layers, dropout=dropout, attn_dropout=attn_dropout,
                cond_dim=state["resnet.conv1.weight"].shape[0])


def load_gpt_checkpoint(path, map_location="cpu"):
    """Read a GPT checkpoint, ours (04_train_gpt.py) or the authors' PyTorch Lightning one.

    Returns (config, gpt_state, extra): GPTPrior(**config) rebuilds the model and `gpt_state` loads
    into it strictly. `extra` is the rest of the file: ours holds optimizer, scaler, step, rng,
    args, vqvae_sha256; the authors' gives {"vqvae_state": the frozen VQ-VAE stored beside the GPT
    (prefix `vqvae.` removed), "hyper_parameters": ...}. The causal-mask buffers of the authors'
    attention are dropped: they are derived, and fused attention does not need them.
    """
    ckpt = load_checkpoint(path, map_location)
    if isinstance(ckpt, dict) and "hidden_dim" in (ckpt.get("model_config") or {}):   # ours
        extra = {k: v for k, v in ckpt.items() if k not in ("model_config", "model")}
        return dict(ckpt["model_config"]), ckpt["model"], extra
    if isinstance(ckpt, dict) and "state_dict" in ckpt:                              # the authors'
        state = ckpt["state_dict"]
        hparams = ckpt.get("hyper_parameters") or {}
        args = hparams.get("args", hparams) if isinstance(hparams, dict) else hparams
        args = args if isinstance(args, dict) else vars(args)
        # the weights that gpt_config_from_state reads the model's sizes from
        needed = ["resnet.conv1.weight", "fc_in.weight", "fc_out.weight",
                  "attn_stack.pos_embd.emb.d_0"]
        missing = [k for k in needed if k not in state]
        if not any(k.startswith("attn_stack.attn_nets.") for k in state):
            missing.append("attn_stack.attn_nets.*")
        if missing:
            raise InputError(f"{path}: not a VideoGPT prior with embedding conditioning "
                             f"(emb_cond): no {', '.join(missing)} in its state_dict")
        gpt_state = {k: v for k, v in state.items()
                     if not k.startswith("vqvae.") and not k.endswith(".attn.attn.mask")}
        config = gpt_config_from_state(gpt_state, heads=args.get("heads", 4),
                                       dropout=args.get("dropout", 0.2),
                                       attn_dropout=args.get("attn_dropout", 0.3))
        extra = {"vqvae_state": {k[len("vqvae."):]: v for k, v in state.items()
                                 if k.startswith("vqvae.")},
                 "hyper_parameters": hparams}
        return config, gpt_state, extra
    raise InputError(f"{path}: not a GPT checkpoint "
                     "(neither 04_train_gpt.py's model + model_config nor a Lightning state_dict)")


def build_gpt(config, state=None, path="checkpoint", checkpoint_activations=False):
    """GPTPrior(**config), with `state` loaded strictly when given (a clear error names `path`)."""
    model = GPTPrior(**config, checkpoint_activations=checkpoint_activations)
    return model if state is None else load_weights(model, state, path, f"a VideoGPT with {config}")


# --------------------------------------------------------------------------------------------------
# Errors and exit statuses. Every stage ends with one of these (README, "Re-runs, provenance and
# preemption"); a wrong result must never end with 0.
# --------------------------------------------------------------------------------------------------
EXIT_OK = 0            # done, or nothing left to do
EXIT_SOME_FAILED = 1   # finished, but some items failed (01: replays that could not be rendered)
EXIT_BAD_INPUT = 2     # one line `error: <file>: <what is wrong>`; nothing was written
EXIT_INTERRUPTED = 75  # a signal stopped training before --max-steps: checkpoint saved,
                       # re-run resumes (75 is EX_TEMPFAIL of sysexits.h: "try again later")
EXIT_SIGINT = 130      # Ctrl-C in a stage with nothing to checkpoint (128 + SIGINT, as shells say)


class InputError(Exception):
    """Bad input. The message names the file (or flag) and what is wrong, on one line."""


class Interrupted(Exception):
    """A signal (SLURM's preemption or time limit) stopped training early, its checkpoint saved. The
    message says where and how to continue; the status 75 makes `run_all.sh` stop and
    slurm/gpu_stage.sbatch requeue the job (srun returns the ranks' highest status)."""


def run_main(main):
    """Call `main()`. Bad input, and a file that cannot be read or written
    (read-only folder, full disk), become one line `error: <file>: <what is wrong>` on stderr and
    exit status 2; an interrupted training run, one line (from rank 0) and exit status 75; Ctrl-C
    elsewhere, one line and 130 (atomic writes leave nothing half-written)."""
    # A script that starts a stage in the background (run_all.sh, to pass its signals on) leaves
    # SIGINT ignored in it, and Python keeps it so: a Ctrl-C passed on must still stop the stage.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stop, file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut this line
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{Path(sys.argv[0]).stem}: interrupted by SIGINT; what it finished is kept, "
                  "nothing is half-written: re-run to go on", file=sys.stderr, flush=True)
        sys.exit(EXIT_SIGINT)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as err:
        where = err.filename if err.filename is not None else "a file"
        print(f"error: {where}: {err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------------------------------
# Atomic writes: an output exists under its final name only once it is complete, so an interrupted
# stage never leaves a half-written file that a re-run would mistake for a finished one.
# --------------------------------------------------------------------------------------------------
HOST = socket.gethostname().split(".")[0]
_TEMPORARY = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_-]+?)-(?P<pid>\d+)(\.|$)")


def temporary_path(path):
    """Where `path` is written before its rename: `.r_map.nii.gz.tmp-<host>-<pid>.nii.gz` beside it.
    It keeps the final suffix (np.save and nibabel look at it) and says which process on which
    machine owns it, so that a later run can remove it once that process is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}{''.join(path.suffixes)}")


def _process_is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # someone else's process
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete the temporary files that killed runs left under `folder` (recursively): those written
    on this machine by a process that no longer exists. Temporaries of other machines
    (a shared cluster filesystem) are left alone: their process may still be writing.
    Returns the paths removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp-*"):
        match = _TEMPORARY.search(path.name)
        if (match and match["host"] == HOST and not _process_is_alive(int(match["pid"]))
                and path.is_file()):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds. On failure
    the temporary is removed, and a write that fails (full disk, read-only folder) is an InputError
    naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write it ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path, array):
    """np.save to `path` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def open_npy_for_writing(tmp, dtype, shape, final):
    """A writable memory-mapped .npy of `shape` at the temporary path `tmp`,
    its disk space reserved now.

    Without the reservation a memory map is a sparse file, and a full disk shows up only when a page
    is written back: the process dies of SIGBUS, with no message and a large temporary file left
    behind. posix_fallocate makes a full disk an error here, before any work is done: an OSError
    naming `final` (the output the temporary becomes), after the temporary is removed."""
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write it ({err.strerror or err})", str(final)) from None
    return array


def write_tsv(path, table):
    """Write a DataFrame (or list of dicts) as a tab-separated file, atomically; 'n/a' for missing.
    A file that already holds exactly this text is left alone, so a re-run that changes nothing does
    not touch its manifests (nor wake up tools that watch modification times)."""
    text = pd.DataFrame(table).to_csv(sep="\t", index=False, na_rep="n/a")
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def all_or_nothing(paths):
    """Remove the files `paths` when the block fails: a set of outputs that belong together is
    complete or absent, never half there."""
    try:
        yield
    except BaseException:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        raise


def write_json(path, value):
    """json.dump to `path` atomically, indented for a human reader."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# A folder in use: two runs writing one folder (a second `03 --resume` while the first trains, or
# run_all.sh killed and run again while its stage goes on) would each log and checkpoint the same
# steps, and both end with 0.
# --------------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold_folder(folder):
    """Hold `folder` for the block: an exclusive flock on `<folder>/.lock`, which names this process
    (host and pid) for the run that finds it taken: that run stops with an InputError naming the
    holder. The kernel releases the lock when the process ends, however it ends, so a killed run
    never leaves the folder locked; the file stays (removing it would let two runs lock two files).
    Under DDP rank 0 holds it for every rank of its run. A filesystem without locks (some cluster
    mounts) is said, and the run goes on unguarded."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise InputError(f"{folder}: in use by {holder}, another run of this stage: wait for "
                             "it to end, or stop it, before running it again") from None
        except OSError as err:
            print(f"warning: {folder / LOCK_NAME}: cannot lock it ({err.strerror}): a second run "
                  "on this folder at the same time would not be noticed", file=sys.stderr)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{HOST} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Readers that turn a damaged or foreign file into one line naming it
# --------------------------------------------------------------------------------------------------
# labels, not numbers: "001" stays "001"
BIDS_LABEL_COLUMNS = ("sub", "ses", "task", "run", "rep", "level")


def read_tsv(path, required=()):
    """Read a BIDS-style TSV ('n/a' is missing), with the BIDS label columns present kept as text.
    Fails clearly when it is absent or lacks columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=True,
                            dtype={column: str for column in BIDS_LABEL_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable TSV file ({str(err).splitlines()[0]})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def load_npy(path, mmap=True, advice=""):
    """np.load an array we wrote (memory-mapped by default). A missing, truncated or foreign file is
    an InputError naming it; `advice` (e.g. "re-run 01_render_frames.py") ends the message."""
    path = Path(path)
    advice = f"; {advice}" if advice else ""
    if not path.is_file():
        raise InputError(f"{path}: file not found{advice}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        reason = ("truncated" if "mmap length" in str(err) or "Failed to read all data" in str(err)
                  else "empty" if isinstance(err, EOFError) else "not a .npy array")
        first = str(err).split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: {reason} ({first}){advice}") from None


def load_nifti(path):
    """nibabel.load a NIfTI image (header only; nibabel reads the voxels on demand); a missing or
    unreadable file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        import nibabel   # imported here: the training stages and the GPU machines do without it
        return nibabel.load(path)
    except Exception as err:   # nibabel raises many types (ImageFileError, OSError, EOFError ...)
        raise InputError(f"{path}: not a readable NIfTI image "
                         f"({str(err).splitlines()[0]})") from None


def nifti_data(image, path, dtype=np.float32):
    """The voxels of a loaded NIfTI image as a `dtype` array;
    a truncated file is an InputError naming it."""
    try:
        return image.get_fdata(dtype=dtype)
    except Exception as err:   # gzip: EOFError, zlib.error, OSError; a short file: ValueError
        raise InputError(f"{path}: cannot read its voxels (truncated or damaged: "
                         f"{str(err).splitlines()[0] or type(err).__name__})") from None


def read_planted_labels(path, key="planted"):
    """The atlas labels that carry a planted signal in 00_make_demo.py's ground_truth.json: a set of
    ints (06 reports their recovery, 07 compares the controls on them). key "planted": the visual
    parcels; "planted_buttons": those of the button presses (none in a demo made before them)."""
    path = Path(path)
    try:
        truth = json.loads(path.read_text())
        planted = truth[key] if key == "planted" else truth.get(key, {})
        return {int(label) for label in planted}
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InputError(f"{path}: not a ground truth file (expected JSON with a 'planted' object "
                         f"of atlas labels, as 00_make_demo.py writes)") from None


# --------------------------------------------------------------------------------------------------
# BIDS names (sub-01_ses-002_task-shinobi_run-03_level-1_rep-02.bk2 -> {"sub": "01", ...}),
# the split of the fMRI runs (bold/splits.tsv), the frames manifest
# --------------------------------------------------------------------------------------------------
_ENTITY = re.compile(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)")
RUN_ENTITIES = ("sub", "ses", "task", "run")
SPLITS = ("train", "validation", "test")
# 02's split when no flag or file names the test runs: the paper's (section 2.1.4)
DEFAULT_TEST_SESSIONS, DEFAULT_VALIDATION_SESSIONS = ("005",), ("004",)


def bids_entities(path):
    """The key-value entities of a BIDS file name, in order: {'sub': '01', 'ses': '002', ...}."""
    stem = Path(path).name.split(".")[0]
    return dict(_ENTITY.findall(stem))


def has_label(value):
    """Whether a BIDS label is there: a dataset without sessions has none (None, n/a, '')."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) \
        and str(value) != ""


def run_stem(sub, ses, task, run):
    """The BIDS prefix that names one fMRI run: sub-01_ses-002_task-shinobi_run-03; an entity the
    dataset does not have (no session level) is left out, as in its file names."""
    labels = zip(RUN_ENTITIES, (sub, ses, task, run))
    return "_".join(f"{key}-{value}" for key, value in labels if has_label(value))


def run_folder(sub, ses):
    """Where a run's outputs go below a stage's folder: sub-01/ses-002, or sub-01 without
    sessions."""
    return Path(f"sub-{sub}", *([f"ses-{ses}"] if has_label(ses) else []))


def session_flag(text):
    """argparse type of --test-sessions and kin: 'ses-005' and '005' are both given as '005'."""
    return text.removeprefix("ses-")


def run_flag(text):
    """argparse type of --test-runs and kin: 'run-02' and '02' are both given as '02'."""
    return text.removeprefix("run-")


def bids_label(value):
    """A label that compares as a number when it is one: '005' (a manifest), 'ses-005' and '5' (as
    a flag may give it) are all '5'; '' when there is none (a dataset without sessions)."""
    if not has_label(value):
        return ""
    text = re.sub(r"^[a-z]+-", "", str(value))
    return str(int(text)) if text.isdigit() else text


def run_key(row):
    """(sub, ses, task, run) labels of one run (a manifest row or a dict), compared as bids_label
    compares them: how bold/splits.tsv and both manifests name the same run."""
    return tuple(bids_label(row.get(key)) for key in RUN_ENTITIES)


def splits_path(work):
    return Path(work) / "bold" / "splits.tsv"


def read_splits(path):
    """A splits file (02's bold/splits.tsv, or one a user gives 02): a DataFrame with one row per
    run, `sub ses task run split`, after checking the split values and that no run is listed
    twice."""
    table = read_tsv(path, required=(*RUN_ENTITIES, "split"))
    wrong = table[~table["split"].isin(SPLITS)]
    if len(wrong):
        raise InputError(f"{path}: row {wrong.index[0] + 2} has split {wrong['split'].iloc[0]!r}; "
                         f"expected one of {', '.join(SPLITS)}")
    keys = table.apply(run_key, axis=1)
    if keys.duplicated().any():
        row = table[keys.duplicated()].iloc[0]
        stem = run_stem(*(row[k] for k in RUN_ENTITIES))
        raise InputError(f"{path}: run {stem} is listed twice")
    return table


def held_out_runs(work, frames, test_sessions):
    """The run keys of the encoding test runs, which 03 and 04 leave out of training: those of
    bold/splits.tsv when 02 wrote it, else the runs of `frames` (the frames manifest) in
    `test_sessions` (default 005). `test_sessions` given beside the file must name the same runs
    (InputError otherwise); [] names none (train on every run, as the authors did)."""
    path = splits_path(work)
    if test_sessions is not None and not test_sessions:
        return set()
    sessions = {bids_label(s) for s in (test_sessions or DEFAULT_TEST_SESSIONS)}
    if not path.is_file():
        return {run_key(row) for _, row in frames.iterrows() if bids_label(row["ses"]) in sessions}
    splits = read_splits(path)
    in_file = splits["split"] == "test"
    if test_sessions is not None:
        named = splits["ses"].map(bids_label).isin(sessions)
        if (named != in_file).any():
            row = splits[named != in_file].iloc[0]
            raise InputError(f"--test-sessions {' '.join(test_sessions)}: {path} makes run "
                             f"{run_stem(*(row[k] for k in RUN_ENTITIES))} {row['split']}: leave "
                             "the flag out to follow the file, or remake the file with 02's split "
                             "flags")
    return set(splits[in_file].apply(run_key, axis=1))


def training_repetitions(work, test_sessions):
    """The repetitions 03 and 04 train on: rows (dicts) of frames/manifest.tsv with status ok
    outside the encoding test runs (held_out_runs: the models must not see them), in manifest
    order. Frames shown in several runs (a movie every subject watched) are trained on once, and
    not at all when a test run shows them."""
    manifest_path = Path(work) / "frames" / "manifest.tsv"
    manifest = read_tsv(manifest_path, required=(*RUN_ENTITIES, "status", "frames_path",
                                                 "n_frames"))
    held_out = held_out_runs(work, manifest, test_sessions)
    in_test = manifest.apply(run_key, axis=1).isin(held_out)
    test_frames = set(manifest.loc[in_test, "frames_path"].dropna())
    rows = manifest[(manifest["status"] == "ok") & ~in_test
                    & ~manifest["frames_path"].isin(test_frames)]
    rows = rows.drop_duplicates("frames_path")
    if rows.empty:
        raise InputError(f"{manifest_path}: no repetition with status ok outside the "
                         f"{len(held_out)} test run(s)")
    reps = [dict(row) for _, row in rows.iterrows()]
    for rep in reps:
        if not (Path(work) / str(rep["frames_path"])).is_file():
            raise InputError(f"{manifest_path}: frames file {Path(work) / str(rep['frames_path'])} "
                             "is listed as ok but does not exist (re-run 01_render_frames.py)")
    return reps


def repetition_record(rep):
    """What a model's record says of one repetition it trained on (04's, 03's
    `training_repetitions`): its frames and the labels of its run."""
    return {"frames_path": str(rep["frames_path"]),
            **{key: str(rep[key]) if has_label(rep.get(key)) else None for key in RUN_ENTITIES}}


def runs_trained_on(work, record):
    """{run key: the record of the model that trained on it} of the models (04's GPT, 03's
    VQ-VAE) among the inputs of `record` (a features record of 05), from their
    `training_repetitions`; a record of an older 04 names a run by its frames file."""
    trained = {}
    for name in (record or {}).get("inputs", {}):
        model_record = record_path(Path(work) / name)
        for rep in (read_record(model_record) or {}).get("training_repetitions", []):
            labels = {**bids_entities(rep["frames_path"]),
                      **{k: v for k, v in rep.items() if k in RUN_ENTITIES and has_label(v)}}
            trained.setdefault(run_key(labels), model_record)
    return trained


# --------------------------------------------------------------------------------------------------
# Provenance: a stage skips an output only when the output's record says it was made exactly as the
# stage would make it now: the same flags, and the same bytes in every input. Each output that a
# later run may skip has a record beside it, `<output stem>.json`:
#     {"stage": "05_extract", "settings": {"--pool": "none", ...},          the flags that shape it
#      "inputs": {"gpt/demo/ckpt.pt": {"sha256": ..., "size": ..., "mtime_ns": ...}, ...},
#      "output": {"sha256": ..., "size": ..., "mtime_ns": ...}, ...}        the output itself
# An input's sha256 comes from its own record when it has one (its producer hashed it once), so a
# change anywhere upstream changes a fingerprint that every stage downstream compares. Size and
# mtime only let a record vouch for a file without reading it again,
# as git's index does; content decides.
# --------------------------------------------------------------------------------------------------
def file_sha256(path, chunk=1 << 24):
    """Hex sha256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_path(output):
    """The record of an output: `x.npy` -> `x.json`, `ckpt.pt` -> `ckpt.json`."""
    output = Path(output)
    return output.with_name(output.name.split(".")[0] + ".json")


def read_record(path):
    """The record at `path`, or None when there is none. A file that is not one of our records (a
    BIDS sidecar, or a record cut short by a crash) also gives None: the output is then made
    again."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return (record if isinstance(record, dict) and "stage" in record and "settings" in record
            else None)


def hash_file(path):
    """The fingerprint of a file, computed from its bytes: {"sha256", "size", "mtime_ns"}."""
    stat = Path(path).stat()
    return {"sha256": file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(path, known=None):
    """The fingerprint of a file, without reading it when a record vouches for it: `known` (what an
    earlier record of ours said of this input) or the file's own record (what its producer wrote),
    as long as the file still has the size and modification time that record saw.
    Otherwise it is hashed."""
    path = Path(path)
    stat = path.stat()

    def vouches(candidate):
        return isinstance(candidate, dict) and "sha256" in candidate and \
            (candidate.get("size"), candidate.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)

    if vouches(known):   # the caller's record first: the file's own record is read only when needed
        return {k: known[k] for k in ("sha256", "size", "mtime_ns")}
    own = (read_record(record_path(path)) or {}).get("output")
    return {k: own[k] for k in ("sha256", "size", "mtime_ns")} if vouches(own) else hash_file(path)


def input_fingerprints(work, paths, earlier=None):
    """{path relative to work: fingerprint} of input files; `earlier` is an older record's inputs,
    whose fingerprints are reused for files that have not been touched since."""
    earlier = earlier or {}
    fingerprints = {}
    for path in paths:
        name = os.path.relpath(path, work)
        fingerprints[name] = fingerprint(path, earlier.get(name))
    return fingerprints


def vouched_fingerprint(path, advice):
    """The fingerprint of an input, checked against its producer's record (`outputs` lists it by
    name; `output` is the file of the record's own stem): without reading it while it keeps the size
    and modification time the record saw, by its sha256 otherwise. Bytes other than those the record
    lists (another repetition's array copied in its place, a file edited by hand) are an InputError
    naming the file, with `advice`: what is made from it would be wrong, and say it was right. A
    file without a record of ours is only fingerprinted."""
    path = Path(path)
    record = read_record(record_path(path)) or {}
    listed = record.get("outputs", {}).get(path.name)
    if listed is None and path.stem == record_path(path).stem:
        listed = record.get("output")
    found = fingerprint(path, listed)
    if isinstance(listed, dict) and found["sha256"] != listed.get("sha256", found["sha256"]):
        raise InputError(f"{path}: not the file its record {record_path(path)} lists (other bytes: "
                         f"replaced or changed since {record['stage']} wrote it); {advice}")
    return found


def _content(value):
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def changed_settings(record, settings):
    """The flags whose value differs between a record and `settings`, in the order of `settings`."""
    before = record.get("settings", {})
    return [k for k in [*settings, *(k for k in before if k not in settings)]
            if before.get(k) != settings.get(k)]


def changed_inputs(record, inputs):
    """The inputs whose content differs between a record and `inputs`
    (added and removed ones too)."""
    before = record.get("inputs", {})
    return [k for k in [*inputs, *(k for k in before if k not in inputs)]
            if _content(before.get(k)) != _content(inputs.get(k))]


def flags_differ_error(output, record, settings, changed):
    """The InputError for an output made with other flags: names the first differing flag."""
    return InputError(f"{output}: {other_flags_text(record, settings, changed)}: "
                      f"pass the same flags, or --overwrite to redo it")


def other_flags_text(record, settings, changed):
    """'made with --lr 0.0003, not 0.001' for the first flag of `changed` (changed_settings' list),
    and how many others differ."""
    flag = changed[0]
    before, now = record["settings"].get(flag), settings.get(flag)
    others = (f" (and {len(changed) - 1} other flag(s): {', '.join(changed[1:])})"
              if len(changed) > 1 else "")
    return f"made with {flag} {_show(before)}, not {_show(now)}{others}"


def _show(value):
    if value is None:
        return "(unset)"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def is_up_to_date(output, record, stage, settings, inputs, overwrite, say=print):
    """Whether `output` can be skipped: its record exists, describes the file as it is, and equals
    what `stage` would make now with `settings` from `inputs`.

    The one rule every stage applies: different flags -> InputError naming the flag
    (unless --overwrite); a changed input, a missing or damaged record, or a changed output file ->
    False (made again, and said through `say`); otherwise True. `record` is read_record(...) of the
    output (or the checkpoint's own).
    """
    output = Path(output)
    if overwrite or not output.exists():
        return False
    if record is None or record.get("stage") != stage:
        say(f"{stage}: {output} has no record of how it was made: making it again")
        return False
    flags = changed_settings(record, settings)
    if flags:
        raise flags_differ_error(output, record, settings, flags)
    changed = changed_inputs(record, inputs)
    if changed:
        more = f" and {len(changed) - 1} other input(s)" if len(changed) > 1 else ""
        say(f"{stage}: {changed[0]}{more} changed since {output} was made: making it again")
        return False
    # the output itself (or, for a folder of outputs, each file the record lists)
    # as the record saw it
    made = {output: record.get("output")} if record.get("output") else {}
    made |= {output.parent / name: fp for name, fp in record.get("outputs", {}).items()}
    for path, recorded in made.items():
        if not path.is_file():
            say(f"{stage}: {path} is missing: making {output} again")
            return False
        if fingerprint(path, recorded)["sha256"] != recorded.get("sha256"):
            say(f"{stage}: {path} changed since it was made (damaged?): making {output} again")
            return False
    return True


def stale_input(work, record, checked=None):
    """The first input of `record` (a record, or None) that is no longer what the record saw, as
    (its name, the stage of the record that lists it), or None when the whole chain above is
    current.

    Each input recorded by its path under `work` (as input_fingerprints names it) must still exist
    with the recorded sha256, and so must the inputs of its own record, up the chain (results ->
    features -> GPT -> VQ-VAE, frames, BOLD). Inputs recorded by role (01's "bk2", 02's "bold": raw
    data the record does not locate) and plain values (05's timeline) end the chain. `checked`, a
    set shared by calls, holds the (name, sha256) pairs already found current, so that calls over
    many records read each once.
    """
    checked = set() if checked is None else checked
    for name, recorded in (record or {}).get("inputs", {}).items():
        path = Path(work) / name
        if (not isinstance(recorded, dict) or "sha256" not in recorded
                or (name, recorded["sha256"]) in checked):
            continue   # a plain value, or found current already
        if "/" not in name and not path.is_file():
            continue   # a role, not a path
        if not path.is_file() or fingerprint(path, recorded)["sha256"] != recorded["sha256"]:
            return name, record.get("stage")
        above = stale_input(work, read_record(record_path(path)), checked)
        if above:
            return above
        checked.add((name, recorded["sha256"]))
    return None


def new_record(stage, settings, inputs, output=None, **details):
    """A record (dict) for `output`, fingerprinted from its bytes now that it is written; `details`
    are extra fields for the reader (never compared). Library versions are kept for the reader
    too."""
    record = {"stage": stage, "settings": settings, "inputs": inputs, **details,
              "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                           "torch": torch.__version__}}
    if output is not None:
        record["output"] = hash_file(output)
    return record


def write_record(output, record):
    """Write the record of `output` beside it (after the output itself: a crash in between leaves an
    output without a record, which the next run makes again)."""
    write_json(record_path(output), record)


# --------------------------------------------------------------------------------------------------
# CPU threads: the CPUs a job was given, shared between its processes (one thread pool each).
# Left alone, torch and BLAS start one thread per CPU in every process: N worker processes run N x
# CPUs threads, and under SLURM without CPU binding or in a container with a CPU quota they count
# CPUs the job does not have. OMP_NUM_THREADS, when set, is the user's choice and is obeyed.
# --------------------------------------------------------------------------------------------------
def available_cpus(cpu_max=Path("/sys/fs/cgroup/cpu.max")):
    """The CPUs this job may use: the fewest of the process's CPU affinity (taskset, a cpuset),
    SLURM's --cpus-per-task and the cgroup's CPU quota (`cpu_max`: docker --cpus)."""
    counts = [len(os.sched_getaffinity(0))]
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        counts.append(int(os.environ["SLURM_CPUS_PER_TASK"]))
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            counts.append(math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):   # no cgroup v2 CPU controller: no quota to read
        pass
    return max(1, min(counts))


def limit_threads(processes=1):
    """Size the thread pools of this process (torch's, and numpy's and scipy's BLAS) to
    OMP_NUM_THREADS when set, else to its share of available_cpus() among `processes` processes
    of the job. Returns that number of threads."""
    from threadpoolctl import threadpool_limits   # imported here: only the stages that use it

    threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(threads) if threads.isdigit() else max(1, available_cpus() // processes)
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    return threads


# --------------------------------------------------------------------------------------------------
# --- Training plumbing (stages 03 and 04) ---
# One code path for CPU, one GPU and DDP (torchrun, or srun under SLURM: one node or many);
# checkpoints that resume exactly; SLURM preemption; the cosine schedule; a CSV log; mixed
# precision. None of this is the paper's algorithm: it only makes long training runs safe and fast.
# --------------------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class DistContext:
    """Where this process runs: rank `rank` of `world_size` processes, on `device`."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        """Rank 0 alone logs, writes checkpoints and draws figures."""
        return self.rank == 0


def setup_distributed(device="auto"):
    """Join the process group that RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    describe (set by `torchrun`, or by slurm/gpu_stage.sbatch for the processes srun starts), if
    any.

    device: 'auto' (CUDA when torch sees it), 'cuda' or 'cpu'. A plain `python script.py` is a world
    of one and starts no process group; several processes use NCCL on GPUs and gloo on CPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    elif device == "cpu":
        torch_device = torch.device("cpu")
    else:
        raise InputError(f"--device {device}: expected auto, cuda or cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return DistContext(rank, local_rank, world_size, torch_device)


def teardown_distributed():
    """Leave the process group (if one was started)."""
    if dist.is_initialized():
        # Collect first: reference cycles (autograd graphs, DDP's reducer) can keep gloo work
        # objects alive until interpreter exit, where freeing them aborts the process ("terminate
        # called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def split_batch(global_batch, ctx, stage):
    """The per-process share of --batch-size, which counts the samples of one optimizer step over
    all processes: the paper's recipe (64 clips per step for the GPT) is then the same on 1 or 8
    GPUs."""
    if global_batch % ctx.world_size:
        raise InputError(f"--batch-size {global_batch}: does not divide evenly between "
                         f"{ctx.world_size} processes")
    per_rank = global_batch // ctx.world_size
    print0(f"{stage}: batch {global_batch} per optimizer step = "
           f"{ctx.world_size} process(es) x {per_rank}")
    return per_rank


def barrier(ctx):
    """Wait until every process gets here (nothing to wait for in a world of one)."""
    if ctx.world_size > 1:
        dist.barrier()


def print0(*args, **kwargs):
    """print() on rank 0 only, so that N processes do not print N copies."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch (CPU and CUDA) with `seed + rank`:
    ranks draw different clips."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


class PreemptionFlag:
    """Remembers that SIGTERM or SIGUSR1 arrived (SLURM sends one before it kills or requeues a
    job), or SIGINT (Ctrl-C), so that training can save a checkpoint and stop cleanly at the end of
    its step. Made first thing in a training stage's main(): from then on a signal never kills the
    process, whatever it is doing (caching codes, validating, writing a checkpoint, drawing the last
    figure); it is only read where stopping is safe. A signal after the last step is then harmless:
    the run completes and exits 0."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.name = None
        for signum in signals:
            signal.signal(signum, self._handler)

    def _handler(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name

    def agreed(self, ctx):
        """True on every rank as soon as any rank got the signal
        (all ranks must stop at the same step)."""
        if ctx.world_size == 1:
            return self.name is not None
        flag = torch.tensor([float(self.name is not None)], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def interrupted(self, stage, where, kept="checkpoint saved"):
        """The Interrupted exception that ends the run,
        `where` ("at step 7 of 9") and what was `kept`."""
        return Interrupted(f"{stage}: interrupted {where} by {self.name or 'a signal'}; "
                           f"{kept}: re-run to resume")


# Flags that choose the hardware, the speed or the logging of a training run, declared here once for
# 03 and 04: never part of a run's record, so a run may resume on another device, with
# torch.compile, or with other log intervals. A stage adds those it has with add_run_flags;
# settings_of leaves them out.
RUN_FLAGS = {
    "--device": dict(default="auto", choices=("auto", "cuda", "cpu"),
                     help="auto: CUDA when torch sees it"),
    "--workers": dict(type=int, default=4,
                      help="threads that read clips from disk (default %(default)s)"),
    "--tf32": dict(action="store_true",
                   help="TF32 matmuls and convolutions in fp32 (Ampere and later)"),
    "--channels-last": dict(action="store_true", help="channels_last_3d memory format"),
    "--cudnn-benchmark": dict(action="store_true", help="let cuDNN pick the fastest kernels"),
    "--compile": dict(action="store_true", help="torch.compile the model"),
    "--log-every": dict(type=int, default=100,
                        help="steps between log.csv rows (default %(default)s)"),
    "--val-every": dict(type=int, default=1000,
                        help="steps between validation passes (default %(default)s)"),
    "--val-clips": dict(type=int, default=32,
                        help="validation clips, drawn once (default %(default)s)"),
    "--val-samples": dict(type=int, default=2048,
                          help="validation samples per pass (0: all; default %(default)s)"),
    "--ckpt-every": dict(type=int, default=1000,
                         help="steps between checkpoints (default %(default)s)"),
    "--resume": dict(action="store_true",
                     help="continue this stage's unfinished run, if there is one"),
    "--overwrite": dict(action="store_true", help="start over even if a checkpoint exists"),
    "--allow-unfinished": dict(action="store_true",
                               help="use an upstream checkpoint whose training was interrupted"),
}
NOT_RECORDED = {"work", "name", *(flag[2:].replace("-", "_") for flag in RUN_FLAGS)}


def add_split_flags(group):
    """Add the flags that choose 03's and 04's training and validation repetitions to an argparse
    `group`, declared once so that both stages hold out the same ones by default: the frozen VQ-VAE
    never sees the GPT's validation clips."""
    group.add_argument("--test-sessions", nargs="*", default=None, type=session_flag,
                       help="sessions left out of training (the encoding test set; default: the "
                            "test runs of bold/splits.tsv, which 02 writes, else 005); with no "
                            "value: train on every run, as the authors did")
    group.add_argument("--val-reps", type=int, default=2,
                       help="the last N training repetitions (manifest order) held out for validation "
                            "(default 2, the same in 03 and 04)")
    group.add_argument("--frame-step", type=int, default=4,
                       help="60 Hz frames per clip frame (4: clips at 15 Hz)")


def add_run_flags(parser, flags, **defaults):
    """Add the RUN_FLAGS named in `flags` to `parser`, in a group of their own; `defaults` overrides
    theirs by destination (log_every=50)."""
    group = parser.add_argument_group("run (hardware, speed and logging: not part of the record)")
    for flag in flags:
        spec = dict(RUN_FLAGS[flag])
        spec["default"] = defaults.get(flag[2:].replace("-", "_"), spec.get("default"))
        group.add_argument(flag, **spec)


def settings_of(args, leave_out=NOT_RECORDED):
    """The flags of an argparse namespace that shape the result, as {"--flag": value},
    JSON-normalised (tuples become lists) so that they compare equal to the same flags read back
    from a record."""
    settings = {f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k not in leave_out}
    return json.loads(json.dumps(settings))


def checkpoint_to_resume(ckpt_path, stage, settings, inputs, resume, overwrite):
    """What a training stage does with the checkpoint at `ckpt_path`. Returns
    (checkpoint, complete): (None, False) to train from step 0 (no checkpoint, --overwrite, or it
    was trained on other inputs); (checkpoint, True) when that run is complete (the stage skips it);
    (checkpoint, False) to resume it (--resume). Raises InputError when the flags differ, or an
    unfinished run exists without --resume."""
    ckpt_path = Path(ckpt_path)
    if overwrite or not ckpt_path.exists():
        return None, False
    checkpoint = load_checkpoint(ckpt_path)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != stage:
        raise InputError(f"{ckpt_path}: not a checkpoint of {stage} (--overwrite replaces it)")
    if "provenance" not in checkpoint:
        raise InputError(f"{ckpt_path}: written by an older version of {stage}, without a record "
                         "of its inputs: --overwrite to train again (or choose another --work)")
    if not is_up_to_date(ckpt_path, checkpoint["provenance"], stage, settings, inputs, False,
                         say=print0):
        print0(f"{stage}: training from step 0")
        return None, False
    if checkpoint["complete"]:
        return checkpoint, True
    if not resume:
        raise InputError(f"{ckpt_path}: an unfinished run "
                         f"({checkpoint['step']} of {checkpoint['max_steps']} steps) exists: "
                         "pass --resume to continue it or --overwrite to start over")
    return checkpoint, False


def start_over(ckpt_path, ctx):
    """Remove the checkpoint of a run that trains from step 0 (other inputs, or --overwrite), once
    every rank has decided: interrupted at once, the new run must not leave the old run's weights
    behind."""
    barrier(ctx)
    if ctx.is_main:
        Path(ckpt_path).unlink(missing_ok=True)
        record_path(ckpt_path).unlink(missing_ok=True)


@dataclass
class TrainingRun:
    """What a training run (03, 04) is made of, decided before it starts: where it writes, the
    unfinished run it resumes (None: from step 0), the model's keywords, its record (provenance) and
    the stage's training data."""
    out_dir: Path
    checkpoint: dict | None
    model_config: dict
    record: dict
    data: object

    @property
    def ckpt_path(self):
        return self.out_dir / "ckpt.pt"


def run_training(train, args, run, preemption):
    """Join the process group of --device, remove the checkpoint of a run that starts over, call
    train(args, run, ctx, preemption), and leave the group however it ends."""
    ctx = setup_distributed(args.device)
    # the processes on this node share its CPUs (torchrun says how many; srun: OMP_NUM_THREADS)
    limit_threads(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)))
    print0(f"{run.record['stage']}: {torch.get_num_threads()} CPU thread(s) per process "
           "(OMP_NUM_THREADS sets it)")
    try:
        if run.checkpoint is None:
            start_over(run.ckpt_path, ctx)
        train(args, run, ctx, preemption)
    finally:
        teardown_distributed()


def wrap_for_training(model, args, ctx, **ddp_options):
    """The model the training loop calls: under DDP with several processes, compiled with --compile.
    The checkpoints save the model itself, unwrapped."""
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_options)
    if args.compile:
        model = torch.compile(model)
    return model


def split_validation(reps, val_reps, path):
    """(training, validation) repetitions: the last `val_reps` in manifest order are held out. 03
    and 04 hold out the same ones (same default), so the frozen VQ-VAE never saw the GPT's
    validation clips."""
    if len(reps) <= val_reps:
        raise InputError(f"{path}: {len(reps)} usable repetition(s), not enough to hold out "
                         f"--val-reps {val_reps} and still train")
    return reps[:len(reps) - val_reps], reps[len(reps) - val_reps:]


def require_complete(checkpoint, path, producer, allow_flag, allowed=False):
    """Refuse a checkpoint whose training was interrupted (complete False), unless `allowed` (the
    user passed `allow_flag` on purpose). Checkpoints of other origins (the authors') count as
    complete."""
    if isinstance(checkpoint, dict) and checkpoint.get("complete") is False and not allowed:
        raise InputError(f"{path}: unfinished training (step {checkpoint.get('step')} of "
                         f"{checkpoint.get('max_steps')}): re-run {producer} to finish it, "
                         f"or pass {allow_flag} to use it as it is")


def rng_state():
    """The state of every random generator this process uses (python, numpy, torch CPU and CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx):
    """rng_state() of every rank, as a list indexed by rank
    (a checkpoint resumes every rank exactly)."""
    if ctx.world_size == 1:
        return [rng_state()]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states, ctx):
    """Give each rank the generator state it had when `states` (from gather_rng_states) was saved.
    Returns False (and leaves the generators as seeded) when the number of ranks changed."""
    if len(states) != ctx.world_size:
        return False
    set_rng_state(states[ctx.rank])
    return True


def save_checkpoint(path, checkpoint):
    """torch.save(checkpoint) atomically: a kill during the write leaves the previous file intact.

    The stages save a dict with: model (state dict), optimizer, scaler, step, max_steps, complete,
    rng (list by rank), args (vars of the argparse namespace), model_config (the keyword arguments
    that rebuild the model) and provenance (the record: stage, settings, inputs), which is also
    written beside it as `ckpt.json` with the checkpoint's own fingerprint.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a full disk as a RuntimeError of its own
            reason = ("No space left on device" if shutil.disk_usage(tmp.parent).free < 1 << 20
                      else f"torch: {str(err).splitlines()[0]}")
            raise InputError(f"{path}: cannot write it ({reason})") from None
    # its record beside it: what it was made from, whether it is complete
    if "provenance" in checkpoint:
        write_record(path, dict(checkpoint["provenance"], complete=checkpoint["complete"],
                                step=checkpoint["step"], max_steps=checkpoint["max_steps"],
                                output=hash_file(path)))


def cosine_lr(step, max_steps, base_lr, min_lr=0.0):
    """Learning rate at `step`: paper eq. 2 (torch's CosineAnnealingLR over max_steps), base_lr at
    step 0, min_lr at max_steps."""
    progress = min(1.0, step / max(1, max_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class CSVLog:
    """A CSV training log, one row per call to log(), flushed at once (a killed run keeps its rows).

    resume_step: when resuming from a checkpoint at that step, rows written after it by the killed
    run are dropped, so the log of a resumed run equals that of an uninterrupted one.
    """

    def __init__(self, path, fields, resume_step=None):
        self.path = Path(path)
        self.fields = list(fields)
        kept = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)

    def log(self, **row):
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def peak_memory_gb(device):
    """Peak memory so far: allocated CUDA memory on a GPU,
    the process's peak RSS on the host (GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6    # Linux: KiB -> GB


def autocast(device, precision):
    """The autocast context of --precision: fp32 (none), fp16 or bf16 (torch.amp)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device, precision):
    """A GradScaler, active for fp16 only
    (bf16 has fp32's exponent range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
