"""Quality control: image similarity metrics inside a brain mask."""

from __future__ import annotations

from .metrics import ms_ssim, psnr, rmse, robust_data_range, similarity_report, ssim

__all__ = ["ms_ssim", "psnr", "rmse", "robust_data_range", "similarity_report", "ssim"]
