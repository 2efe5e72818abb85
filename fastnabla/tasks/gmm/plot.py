"""The run figure: pretrained samples, fine-tuned samples, the closed-form target, and TV over training.

Dimensions beyond the first two are marginalised (exact for diagonal mixtures); 1-D tasks get
histograms over the density.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastnabla.tasks.gmm.mixture import GaussianMixture  # noqa: E402
from fastnabla.utils.io import atomic_write  # noqa: E402


def _marginal(mix: GaussianMixture, dims: int) -> GaussianMixture:
    return GaussianMixture(mix.means[:, :dims], mix.stds[:, :dims], mix.weights)


def _limits(*arrays: torch.Tensor, dims: int) -> list[tuple[float, float]]:
    allx = torch.cat([a[:, :dims] for a in arrays])
    lo = torch.quantile(allx, 0.002, dim=0) - 0.5
    hi = torch.quantile(allx, 0.998, dim=0) + 0.5
    return [(float(lo[i]), float(hi[i])) for i in range(dims)]


def plot_run(
    path: str | Path,
    target: GaussianMixture,
    prior_samples: torch.Tensor,
    final_samples: torch.Tensor,
    tv_curve: Sequence[tuple[int, float]],
    tv_prior: float,
    title: str = "",
    max_points: int = 4000,
) -> None:
    """Write the 4-panel PNG atomically."""
    d = target.dim
    dims = min(d, 2)
    tgt = _marginal(target, dims)
    prior_samples, final_samples = prior_samples[:max_points].double(), final_samples[:max_points].double()
    lims = _limits(prior_samples, final_samples, dims=dims)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4))

    if dims == 2:
        gx = torch.linspace(*lims[0], 200, dtype=torch.float64)
        gy = torch.linspace(*lims[1], 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(gx, gy, indexing="xy")
        dens = tgt.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)).exp().reshape(xx.shape)
        for ax, pts, name in (
            (axes[0], prior_samples, "pretrained sampler"),
            (axes[1], final_samples, "fine-tuned sampler"),
        ):
            ax.contour(xx.numpy(), yy.numpy(), dens.numpy(), levels=8, colors="0.6", linewidths=0.6)
            ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.35)
            ax.set_title(name)
        axes[2].contourf(xx.numpy(), yy.numpy(), dens.numpy(), levels=30, cmap="viridis")
        for k in range(tgt.num_components):
            m = tgt.means[k]
            axes[2].annotate(f"{float(tgt.weights[k]):.2f}", (float(m[0]), float(m[1])), color="w", ha="center")
        axes[2].set_title("target p#·R^β (closed form, mode weights)")
        for ax in axes[:3]:
            ax.set_xlim(*lims[0])
            ax.set_ylim(*lims[1])
            ax.set_aspect("equal", adjustable="box")
    else:
        grid = torch.linspace(*lims[0], 400, dtype=torch.float64)[:, None]
        dens = tgt.log_prob(grid).exp()
        for ax, pts, name in (
            (axes[0], prior_samples, "pretrained sampler"),
            (axes[1], final_samples, "fine-tuned sampler"),
            (axes[2], None, "target p#·R^β"),
        ):
            if pts is not None:
                ax.hist(pts[:, 0].numpy(), bins=80, density=True, alpha=0.5)
            ax.plot(grid[:, 0].numpy(), dens.numpy(), color="k")
            ax.set_title(name)
    if d > 2:
        axes[0].set_xlabel(f"first two of {d} dimensions (others marginalised)")

    if tv_curve:
        its, tvs = zip(*tv_curve, strict=True)
        axes[3].plot(its, tvs, marker="o", ms=3, label="fine-tuned")
    axes[3].axhline(tv_prior, color="0.5", ls="--", label="pretrained")
    axes[3].set_xlabel("iteration")
    axes[3].set_ylabel("mode-weight TV to target")
    axes[3].set_ylim(bottom=0)
    axes[3].legend()
    axes[3].set_title("TV over training")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
