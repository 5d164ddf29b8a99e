"""Check every input file before any work starts (the run's pre-flight).

The preprocessing steps check their inputs again, but a cohort run should not find a
truncated file or a mismatched ``.bval`` hours into processing, after other outputs were
written. :func:`check_session_inputs` reads each selected image once, with the same checks
the steps use (:func:`~ihf_bids.preproc.anat.check_anatomical_image`,
:func:`~ihf_bids.preproc.dwi.load_dwi`, :func:`~ihf_bids.preproc.dwi.read_gradients`), and
reports every problem in one :class:`~ihf_bids.errors.InputDataError` (exit code 65).

The group level reads the participant level's derivatives instead:
:func:`derivative_site` and :func:`check_same_grid` refuse a derivative without its
``Site`` and derivatives written on different grids (participant runs with different
``--anat-resolution`` or ``--dwi-resolution`` into one output directory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputDataError

if TYPE_CHECKING:  # pragma: no cover
    from ..bids.layout import DWIRun, SessionInputs

__all__ = ["check_dwi_run", "check_same_grid", "check_session_inputs", "derivative_site"]

LOGGER = logging.getLogger(__name__)

#: at most this many problems are spelled out in the error; the rest are counted
MAX_LISTED = 20


def check_dwi_run(run: DWIRun) -> None:
    """Check one DWI run: its image, and that its gradient files exist and fit the image.

    Parameters
    ----------
    run : ihf_bids.bids.layout.DWIRun
        The image and the ``.bval``/``.bvec`` found for it by BIDS inheritance.

    Raises
    ------
    InputDataError
        Missing gradient files, an unusable image (see :func:`~ihf_bids.preproc.dwi.load_dwi`)
        or gradients that do not fit it (see :func:`~ihf_bids.preproc.dwi.read_gradients`), or
        fewer than six distinct gradient directions (no tensor fit).
    """
    from .dwi import MIN_TENSOR_DIRECTIONS, distinct_directions, load_dwi, read_gradients

    missing = [ext for ext, found in ((".bval", run.bval), (".bvec", run.bvec)) if found is None]
    if missing:
        stem = run.nifti.name.split(".nii")[0]
        them = "them" if len(missing) > 1 else "it"
        raise InputDataError(
            f"DWI file {run.nifti} has no {' and no '.join(missing)} file (looked for {stem}"
            f"{missing[0]} beside it and up the BIDS inheritance tree); write {them} with the image "
            "(dcm2niix -b y), or leave the run out with --bids-filter-file"
        )
    _, data = load_dwi(run.nifti)
    bvals, bvecs = read_gradients(run.bval, run.bvec, data.shape[3])
    directions = distinct_directions(bvals, bvecs)
    if directions < MIN_TENSOR_DIRECTIONS:
        raise InputDataError(
            f"b-vector file {run.bvec}: {directions} distinct gradient direction(s); "
            f"the tensor fit (FA) needs at least {MIN_TENSOR_DIRECTIONS}. Leave the run out with "
            "--bids-filter-file"
        )


def _problem(check, path) -> str | None:
    try:
        check(path)
    except InputDataError as err:
        return str(err)
    return None


def check_session_inputs(
    sessions: Sequence[SessionInputs], *, target_reference: str | os.PathLike[str] | None = None,
    nprocs: int = 1,
) -> None:
    """Check every image of ``sessions`` (and the ``--target-reference`` image), or raise.

    Parameters
    ----------
    sessions : sequence of SessionInputs
        The selected sessions.
    target_reference : path, optional
        The single image given with ``--target-reference``.
    nprocs : int
        Files checked at once (reading is mostly decompression, which releases the GIL).

    Raises
    ------
    InputDataError
        One error listing every file that cannot be used, each with its reason and fix.
    """
    from .anat import check_anatomical_image

    jobs = [(check_anatomical_image, path) for s in sessions for path in (*s.t1w, *s.t2w)]
    jobs += [(check_dwi_run, run) for s in sessions for run in s.dwi]
    if target_reference is not None:
        jobs.append((check_anatomical_image, Path(target_reference)))
    LOGGER.info("checking %d input image(s)", len(jobs))
    with ThreadPoolExecutor(max_workers=max(1, min(nprocs, 8))) as pool:
        problems = [p for p in pool.map(lambda job: _problem(*job), jobs) if p]
    if not problems:
        return
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise InputDataError(
        f"{len(problems)} input file(s) cannot be used; nothing was processed:\n{listed}{more}\n"
        "Fix the files, or leave them out with --participant-label, --session-label or "
        "--bids-filter-file (docs/troubleshooting.md lists each message)."
    )


# --------------------------------------------------------------------------- #
# the group level's inputs: derivatives of the participant level
# --------------------------------------------------------------------------- #
def derivative_site(path: str | os.PathLike[str]) -> str:
    """The ``Site`` recorded in the sidecar of a derivative image.

    Parameters
    ----------
    path : path
        A derivative image written by the participant level.

    Returns
    -------
    str
        The site label.

    Raises
    ------
    InputDataError
        The sidecar is missing, unreadable or has no ``Site`` (exit code 65); the message
        names the sidecar and says to re-run the participant level for the image.

    Examples
    --------
    >>> import json, tempfile
    >>> image = Path(tempfile.mkdtemp()) / "sub-01_desc-preproc_T1w.nii.gz"
    >>> _ = image.with_name("sub-01_desc-preproc_T1w.json").write_text(json.dumps({"Site": "ge"}))
    >>> derivative_site(image)
    'ge'
    """
    import json

    from ..imageio import sidecar_path

    image = Path(path)
    sidecar = sidecar_path(image)
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"cannot be read ({err})"
    else:
        site = content.get("Site") if isinstance(content, dict) else None
        if isinstance(site, str) and site.strip():
            return site.strip()
        problem = "has no Site field"
    raise InputDataError(
        f"the sidecar {sidecar} of the derivative {image} {problem}; the group level needs the site of "
        "every participant output. Re-run the participant level for this participant (same OUTPUT_DIR and "
        "options), or remove its outputs from OUTPUT_DIR."
    )


def check_same_grid(paths: Iterable[str | os.PathLike[str]], *, what: str = "images") -> None:
    """Refuse derivative images that are not all on one voxel grid (shape and affine).

    Only the headers are read. A mix comes from participant runs with different
    ``--anat-resolution`` (or ``--dwi-resolution``) written into one output directory.

    Parameters
    ----------
    paths : iterable of path
        Derivative images that one network or one evaluation uses together.
    what : str
        What they are, for the message (e.g. ``"T1w/T2w images"``).

    Raises
    ------
    InputDataError
        Naming two files on different grids, their shapes and voxel sizes, and the fix.
    """
    import nibabel as nib
    import numpy as np

    first: tuple[Path, tuple[int, ...], np.ndarray] | None = None
    for raw in paths:
        path = Path(raw)
        try:
            img = nib.load(str(path))
        except Exception as err:  # nibabel raises many kinds for broken files
            raise InputDataError(
                f"the derivative {path} cannot be read ({type(err).__name__}: {err}); re-run the participant "
                "level for this participant, or remove its outputs from OUTPUT_DIR"
            ) from err
        shape, affine = tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=float)
        if first is None:
            first = (path, shape, affine)
            continue
        if shape != first[1] or not np.allclose(affine, first[2], atol=1e-4):
            def voxel(a: np.ndarray) -> str:
                return "x".join(f"{v:g}" for v in np.round(np.sqrt((a[:3, :3] ** 2).sum(axis=0)), 4))

            raise InputDataError(
                f"the {what} in OUTPUT_DIR are on different grids: {first[0]} (shape {first[1]}, "
                f"{voxel(first[2])} mm voxels) and {path} (shape {shape}, {voxel(affine)} mm voxels). "
                "The participant level was run with different --anat-resolution/--dwi-resolution into one "
                "output directory. Use one resolution per OUTPUT_DIR: re-run the odd participants with the "
                "same resolution as the others (after removing their outputs), or give each resolution its "
                "own OUTPUT_DIR."
            )
