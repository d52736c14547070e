"""A diffusion head over one continuous token (MAR, Li et al. 2024, "Autoregressive Image
Generation without Vector Quantization"): a small MLP denoises a ``dim``-wide vector given a
condition vector (the transformer's hidden state), so that each next visual embedding is
*drawn* from what the prompt leaves open instead of regressed to its mean.

The network is MAR's: the noisy vector projected to ``width``, then ``depth`` residual MLP
blocks, each modulated by adaLN (shift, scale and gate from the sum of the timestep's
embedding and the projected condition), modulations and output zero-initialised as in DiT.
Training is DDPM noise prediction over a cosine schedule (diffusers' ``DDIMScheduler``
adds the noise), each condition repeated at ``repeats`` timesteps; sampling runs the
deterministic DDIM sampler from the noise it is given, so the caller decides which random
stream each row draws from, and classifier-free guidance combines the noise predictions of
conditional and unconditional rows.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from anygen.sampling import guide

TRAIN_TIMESTEPS = 1000


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )


class _Block(nn.Module):
    """x + gate * MLP(modulate(LayerNorm(x), shift, scale)), the modulation from ``c``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    def __init__(self, dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.dim = dim
        self.time = nn.Sequential(
            Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0),
            TimestepEmbedding(width, width),
        )
        self.cond = nn.Linear(cond_dim, width)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, dim)
        for layer in (self.out_ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.scheduler = _scheduler()  # adds training noise
        self._samplers: dict[tuple[int, str], DDIMScheduler] = {}  # (steps, device): timesteps set

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The noise in ``x`` (R, dim) at timesteps ``t`` (R,) given ``cond`` (R, cond_dim)."""
        # diffusers' sinusoidal Timesteps are fp32 whatever the model's dtype
        frequencies = self.time[0](t).to(self.time[1].linear_1.weight.dtype)
        c = self.time[1](frequencies).to(cond.dtype) + self.cond(cond)
        h = self.inp(x.to(cond.dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_ada(c).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)

    def loss(self, cond: torch.Tensor, target: torch.Tensor, repeats: int = 4) -> torch.Tensor:
        """Mean squared error of the predicted noise: each target (R, dim) noised at
        ``repeats`` timesteps drawn uniformly (from the global random stream, as training
        draws everything else)."""
        if target.shape[:-1] != cond.shape[:-1] or target.shape[-1] != self.dim:
            raise ValueError(
                f"targets {tuple(target.shape)} do not fit conditions {tuple(cond.shape)} "
                f"and width {self.dim}"
            )
        cond = cond.repeat(repeats, 1)
        x0 = target.float().repeat(repeats, 1)
        t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        return nn.functional.mse_loss(self(xt, t, cond).float(), noise)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        steps: int,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Vectors (n, dim) by ``steps`` DDIM steps (eta 0) from ``noise`` (n, dim). With
        guidance ``cond`` holds the n conditional rows and then the n unconditional ones,
        and each step's noise prediction is ``guide(conditional, unconditional, scale)``."""
        n = noise.shape[0]
        guided = guidance_scale != 1.0
        if cond.shape[0] != (2 * n if guided else n):
            raise ValueError(f"{cond.shape[0]} conditions for {n} rows (guided: {guided})")
        if steps < 1:
            raise ValueError(f"the diffusion head needs steps >= 1, got {steps}")
        key = (steps, str(noise.device))
        if key not in self._samplers:  # DDIM's step (eta 0) keeps no state between calls
            self._samplers[key] = _scheduler()
            self._samplers[key].set_timesteps(steps, device=noise.device)
        scheduler = self._samplers[key]
        x = noise.float()
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guided else x
            eps = self(inp, t.expand(inp.shape[0]), cond).float()
            if guided:
                eps = guide(eps[:n], eps[n:], guidance_scale)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x
