"""The related initialisations of the source documents; each module registers its entries.

- ``lsuv`` — LSUV, Mishkin & Matas (2016); needs data.
- ``datadep`` (``variant="kmeans" | "pca" | "gaussian"``) and ``datadep_kmeans`` /
  ``datadep_pca`` / ``datadep_gaussian`` — Krähenbühl et al. (2016); needs data.
- ``gabor`` — Gabor first layer, Rivas & Rai (2023).
- ``filterbank`` — clustered filters of trained models, Ulm et al.; needs ``bank=``.
- ``lion_dg`` and ``lsuv_lion_dg`` (needs data) — zero-initialised auxiliary heads (LION-DG);
  both run on ``ds-simplecnn`` (their ``requires_model``).
"""

from . import datadep, filterbank, gabor, lion_dg, lsuv

__all__ = ["datadep", "filterbank", "gabor", "lion_dg", "lsuv"]
