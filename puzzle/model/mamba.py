"""The Mamba2 mixer of a hybrid family (NemotronH), pure PyTorch: transformers' `NemotronHMamba2Mixer` as its
reference path computes it (models/nemotron_h/modeling_nemotron_h.py: `forward`, `causal_conv1d_forward`,
`mamba2_scan_forward`, `mamba2_chunk_scan`, `mamba2_selective_state_update`, `NemotronHRMSNormGated`), with the
same parameter names so that conversion is a rename of the layer prefix.

  in_proj   x (B, T, D) -> [z (B, T, I) | xBC (B, T, I + 2 G N) | dt (B, T, H)]
  conv1d    depthwise causal convolution of width K over xBC, then silu
  SSD scan  per head h: state_t = exp(dt_t A_h) state_{t-1} + dt_t B_t x_t;  y_t = C_t state_t + D_h x_t
            (chunked over `chunk_size` tokens for a prompt, one recurrent step per decoded token)
  norm      gated RMSNorm per group: rms(y * silu(z)) over I / G channels, times its weight
  out_proj  (B, T, I) -> (B, T, D)

Shapes: B batch, T tokens, D hidden, H heads, P head_dim, I = H * P, G groups, N state size, K conv width.

The decode state lives in the forward's cache object (transformers' `Cache`), per layer, beside the KV cache
that attention layers keep in it: the conv state (B, I + 2 G N, K), the last K inputs of the convolution, and
the SSM state (B, H, P, N) in float32 (`mamba_states`). A prompt with a state continues it (chunked prefill).

Imports only torch: this file travels with every saved child (modeling_puzzle.py imports it relatively).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import MambaConfig

_STATES = "puzzle_mamba_states"  # the cache attribute holding {layer: [conv state, ssm state]}


def mamba_states(cache) -> dict | None:
    """The Mamba2 states of a forward's cache ({layer index: [conv (B, C, K), ssm (B, H, P, N)]}), created
    empty on first use; None without a cache."""
    if cache is None:
        return None
    states = getattr(cache, _STATES, None)
    if states is None:
        states = {}
        setattr(cache, _STATES, states)
    return states


class GatedRMSNorm(nn.Module):
    """transformers `NemotronHRMSNormGated`: in float32, y * silu(z), then an RMSNorm over each of the G groups
    of I / G channels, cast back to y's dtype and times the weight (I,)."""

    def __init__(self, size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        *prefix, size = y.shape
        groups = y.view(*prefix, size // self.group_size, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * groups.view(*prefix, size).to(dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba2 mixer (`mamba`: heads, head_dim, state, groups); the convolution width, biases, chunk size,
    time-step limits and norm epsilon are the parent config's (`conv_kernel`, `use_conv_bias`, `use_bias`,
    `chunk_size`, `time_step_limit`, `rms_norm_eps` = NemotronH's `layer_norm_epsilon`)."""

    def __init__(self, config, mamba: MambaConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        act = getattr(config, "mamba_hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Mamba2 mixers with activation {act!r} are not supported (silu only)")
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = mamba.num_heads, mamba.head_dim
        self.ssm_state_size, self.n_groups = mamba.state_dim, mamba.num_groups
        self.intermediate_size = mamba.inner_size
        self.chunk_size = int(getattr(config, "chunk_size", 128))
        limit = getattr(config, "time_step_limit", None) or (0.0, float("inf"))
        self.time_step_limit = (_json_float(limit[0]), _json_float(limit[1]))
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        kernel = int(getattr(config, "conv_kernel", 4))
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, padding=kernel - 1,
                                bias=bool(getattr(config, "use_conv_bias", True)))
        bias = bool(getattr(config, "use_bias", False))
        self.in_proj = nn.Linear(config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.norm = GatedRMSNorm(self.intermediate_size, self.intermediate_size // self.n_groups, config.rms_norm_eps)
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D), already normed
        padding_mask: torch.Tensor | None = None,  # (B, T) 1 = real token, or None: no padding in these T
        cache=None,  # the forward's Cache (or None): its Mamba2 states are read and updated in place
    ) -> torch.Tensor:
        B, T, _ = x.shape
        dtype = x.dtype
        x = _masked(x, padding_mask)
        z, xBC, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        states = mamba_states(cache) if self.layer_idx is not None else None
        state = None if states is None else states.get(self.layer_idx)
        xBC = _masked(self.convolve(xBC.transpose(1, 2), states, state).transpose(1, 2), padding_mask)
        xs, Bm, Cm = xBC.split([self.intermediate_size, self.n_groups * self.ssm_state_size,
                                self.n_groups * self.ssm_state_size], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,)
        if state is not None and T == 1:  # one decoded token: the recurrent step
            y = self.step(xs, Bm, Cm, dt, A, state)
        else:
            y, last = mamba2_chunk_scan(
                xs.view(B, T, self.num_heads, self.head_dim), dt, A,
                Bm.view(B, T, self.n_groups, self.ssm_state_size), Cm.view(B, T, self.n_groups, self.ssm_state_size),
                self.chunk_size, self.D, self.dt_bias, None if state is None else state[1], self.time_step_limit)
            y = y.reshape(B, T, self.intermediate_size)
            if states is not None:
                states[self.layer_idx][1] = last
        return self.out_proj(self.norm(y, z).to(dtype))

    def convolve(self, xBC: torch.Tensor, states: dict | None, state: list | None) -> torch.Tensor:
        """silu(causal depthwise conv) of xBC (B, C, T), continuing a cached conv state; the last K inputs
        become the layer's conv state (zeros to their left for a prompt shorter than K, as transformers'
        `LinearAttentionLayer.update_conv_state` pads)."""
        T, K = xBC.shape[-1], self.conv1d.kernel_size[0]
        weight = self.conv1d.weight.squeeze(1)  # (C, K)
        if state is not None:
            full = torch.cat([state[0], xBC], dim=-1)  # (B, C, K + T): the past K inputs first
        else:
            full = F.pad(xBC, (K - T, 0)) if T < K else xBC
        if states is not None:
            conv = full[..., -K:].clone()
            if state is None:
                states[self.layer_idx] = [conv, None]
            else:
                state[0] = conv
        if state is not None and T == 1:  # `causal_conv1d_update`: one output from the last K inputs
            out = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), self.conv1d.bias, groups=self.conv_dim)[..., -1:]
        else:  # `causal_conv1d_fn` over the inputs (after the cached ones), padded K - 1 on the left
            out = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), self.conv1d.bias, padding=K - 1,
                           groups=self.conv_dim)[..., :full.shape[-1]][..., -T:]
        return F.silu(out).to(xBC.dtype)

    def step(self, xs, Bm, Cm, dt, A, state: list) -> torch.Tensor:
        """One token through the SSM (transformers `mamba2_selective_state_update`, dt_softplus with dt_bias,
        no time-step clamp: the recurrent form applies none), updating the SSM state (B, H, P, N) in place of the
        layer's entry. (B, 1, I) -> (B, 1, I)."""
        B = xs.shape[0]
        H, P, N, G = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups
        x = xs.view(B, H, P)
        dt = F.softplus(dt.view(B, H, 1).expand(B, H, P) + self.dt_bias[:, None].to(dt.dtype))[..., None]  # (B,H,P,1)
        dA = torch.exp(dt.float() * A[:, None, None].float())  # (B, H, P, N)
        Bh = Bm.view(B, G, 1, N).expand(B, G, H // G, N).reshape(B, H, 1, N)
        Ch = Cm.view(B, G, 1, N).expand(B, G, H // G, N).reshape(B, H, N)
        ssm = state[1] * dA + dt * Bh * x[..., None]  # (B, H, P, N)
        state[1] = ssm.to(state[1].dtype)
        ssm = ssm.to(Ch.dtype)
        y = torch.bmm(ssm.view(B * H, P, N), Ch.reshape(B * H, N, 1)).view(B, H, P)
        y = (y + x * self.D[:, None]).to(y.dtype)
        return y.to(xs.dtype).view(B, 1, H * P)


def _json_float(value) -> float:
    """A float as config.json holds it: transformers 5 writes inf as {"__float__": "Infinity"} (configuration_utils.py
    `_encode_special_floats`) and decodes it on load; transformers 4.x reads that dict back as it is."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def _masked(h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Padding positions zeroed (transformers `apply_mask_to_padding_states`), so they leave no trace in the
    convolution's or the SSM's state."""
    if padding_mask is None:
        return h
    return (h * padding_mask[:, :, None]).to(h.dtype)


def _chunks(t: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """(b, T, ...) zero-padded by `pad` tokens and split into chunks: (b, c, chunk, ...)."""
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): entry [i, j] = x[j+1] + ... + x[i] for j <= i, -inf above the diagonal
    (transformers `segment_sum`: cumulative sums under a mask, stabler than differences)."""
    L = x.size(-1)
    x = x[..., None].expand(*x.size(), L)
    below = torch.tril(torch.ones(L, L, device=x.device, dtype=torch.bool), diagonal=-1)
    out = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(L, L, device=x.device, dtype=torch.bool), diagonal=0)
    return out.masked_fill(~keep, -torch.inf)


def mamba2_chunk_scan(x, dt, A, Bm, Cm, chunk_size: int, D, dt_bias, initial_state, dt_limit):
    """The SSD scan over a prompt in chunks, as transformers `mamba2_chunk_scan` (its steps 1-4, in float32):
    x (b, T, h, p), dt (b, T, h) before dt_bias and softplus, A (h,), B/C (b, T, g, n), D (h,), the initial
    state (b, h, p, n) or None. Returns y (b, T, h, p) in float32 (the D skip included) and the final state
    (b, h, p, n)."""
    b, T, h, p = x.shape
    g = Bm.shape[2]
    dt = F.softplus(dt + dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = x.float()
    Bm = Bm.float().repeat_interleave(h // g, dim=2, output_size=h)  # (b, T, h, n)
    Cm = Cm.float().repeat_interleave(h // g, dim=2, output_size=h)
    pad = (chunk_size - T % chunk_size) % chunk_size
    skip = D[..., None] * F.pad(x, (0, 0, 0, 0, 0, pad))  # (b, T + pad, h, p)
    x = x * dt[..., None].float()  # discretised input
    A = A.to(x.dtype) * dt.float()  # (b, T, h)
    x, A, Bm, Cm = (_chunks(t, pad, chunk_size) for t in (x, A, Bm, Cm))
    A = A.permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)
    # 1. within each chunk: attention-like weights C_l . B_s times the decay from s to l
    L = torch.exp(_segment_sum(A))  # (b, h, c, l, s)
    G = torch.einsum("bclhn,bcshn->bclsh", Cm, Bm)
    M = G * L.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", M, x)
    # 2. each chunk's own contribution to the state at its end
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    B_decay = Bm * decay_states.permute(0, -2, -1, 1)[..., None]
    states = torch.einsum("bclhn,bclhp->bchpn", B_decay, x)
    # 3. the state at each chunk boundary, the initial state decayed through the chunks before
    previous = (initial_state[:, None].to(dtype=states.dtype, device=states.device) if initial_state is not None
                else torch.zeros_like(states[:, :1]))
    states = torch.cat([previous, states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    # 4. each chunk's start state read out by C, decayed to each position
    y_off = torch.einsum("bclhn,bchpn->bclhp", Cm, states) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).contiguous().reshape(b, -1, h, p) + skip
    return y[:, :T], final
