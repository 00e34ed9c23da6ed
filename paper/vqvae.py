"""VideoGPT's VQ-VAE (paper section 2.3.1.1): 3D convolutions with axial attention compress a clip of
16 frames into a grid of codes, (t, h, w) = (4, 8, 8) at the paper's 128 px, from a codebook of 1,024
vectors learned by exponential moving averages (eqs. 3-6); its loss is eq. 1 (VQVAE.forward).

The module and parameter names are VideoGPT's (Yan et al. 2021), so that its checkpoints and the
paper's authors' load with strict key matching. Videos are (B, C, T, H, W) floats in [-0.5, 0.5].
03_train_vqvae.py trains it; 04 and 05 read its codes (VQVAE.encode, always in exact float32).
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
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


