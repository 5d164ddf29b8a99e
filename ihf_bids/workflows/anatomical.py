"""Anatomical preprocessing: T1w (the subject's reference) and T2w into the template space."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..templates import TEMPLATE_SPACE

#: Within a session, the metric sees the reference's brain mask grown by this margin (mm): the
#: brain's edge carries most of the alignment signal (docs/benchmark-registration.md).
WITHIN_SESSION_MASK_MARGIN_MM = 10.0

if TYPE_CHECKING:
    from nipype.pipeline.engine import Workflow

    from .base import TemplateFiles

__all__ = ["WITHIN_SESSION_MASK_MARGIN_MM", "init_anat_preproc_wf"]

_OUTPUTS = ["preproc", "mask", "native", "native_mask", "to_template", "from_template",
            "from_template_invert", "affine_file", "warp_file", "conform_record", "registration"]


def init_anat_preproc_wf(
    *,
    template: TemplateFiles,
    registration: str = "affine",
    random_seed: int = 0,
    is_reference: bool = True,
    modality: str = "T1w",
    reference_modality: str = "T1w",
    name: str = "anat_preproc_wf",
) -> Workflow:
    """Conform, N4, brain mask, register to the template, resample and normalize.

    Parameters
    ----------
    template : TemplateFiles
        Template images on the anatomical grid.
    registration : {"affine", "syn"}
        Model of the registration to the template.
    is_reference : bool
        True for the subject's anatomical reference (usually the T1w): it is registered to
        the template itself. False (T2w): it is registered rigidly to the reference, given on
        ``inputnode.ref_native``/``ref_mask``/``ref_to_template``, starting from the scanner
        geometry (one session: the headers already relate the two) with bounded motion, and
        shares its brain mask.
    modality, reference_modality : str
        This image's and the reference's suffix (names of the registrations in sidecars).

    Inputs: ``in_file`` (and, when not the reference, ``ref_native``, ``ref_mask``,
    ``ref_to_template``, ``ref_registration``). Outputs: ``preproc`` and ``mask`` on the
    template grid, ``native`` (bias-corrected, native space; what the session's other images
    register to), ``native_mask``, transforms, the conform record and ``registration`` (the quality records of every
    registration that placed the image, for its sidecar).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .interfaces import (
        ApplyTransforms,
        ConformAnatomical,
        N4BiasCorrection,
        NormalizeIntensity,
        RegisterImages,
        TemplateBrainMask,
    )

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(["in_file", "ref_native", "ref_mask", "ref_to_template",
                                               "ref_registration"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(_OUTPUTS), name="outputnode")
    conform = pe.Node(ConformAnatomical(), name="conform")
    n4 = pe.Node(N4BiasCorrection(), name="n4")
    to_template = pe.Node(ApplyTransforms(reference_file=template.anat_t1, interpolation="linear"),
                          name="resample_to_template")
    mask_to_template = pe.Node(
        ApplyTransforms(reference_file=template.anat_t1, interpolation="linear", threshold=0.5),
        name="mask_to_template")
    normalize = pe.Node(NormalizeIntensity(), name="normalize")
    wf.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, n4, [("out_file", "in_file")]),
        (n4, to_template, [("out_file", "in_file")]),
        (to_template, normalize, [("out_file", "in_file")]),
        (mask_to_template, normalize, [("out_file", "mask_file")]),
        (mask_to_template, outputnode, [("out_file", "mask")]),
        (normalize, outputnode, [("out_file", "preproc")]),
        (n4, outputnode, [("out_file", "native")]),
        (conform, outputnode, [("record", "conform_record")]),
    ])
    if is_reference:
        brain = pe.Node(TemplateBrainMask(voxel_size=template.anat_resolution, mode=registration,
                                          random_seed=random_seed, step=f"{modality}To{TEMPLATE_SPACE}"),
                        name="brain_mask")
        wf.connect([
            (n4, brain, [("out_file", "in_file")]),
            (brain, to_template, [("forward_transforms", "transforms")]),
            (brain, mask_to_template, [("mask_file", "in_file"), ("forward_transforms", "transforms")]),
            (brain, outputnode, [("mask_file", "native_mask"), ("forward_transforms", "to_template"),
                                 ("inverse_transforms", "from_template"),
                                 ("inverse_invert", "from_template_invert"),
                                 ("affine_file", "affine_file"), ("warp_file", "warp_file"),
                                 ("quality", "registration")]),
        ])
        return wf
    # Not the reference: rigid to the reference's native image, then its transforms.
    to_ref = pe.Node(RegisterImages(mode="rigid", random_seed=random_seed, start="scanner geometry",
                                    within_session=True, fixed_mask_margin_mm=WITHIN_SESSION_MASK_MARGIN_MM,
                                    step=f"{modality}To{reference_modality}"),
                     name="register_to_reference")
    chain = pe.Node(niu.Merge(2, ravel_inputs=True), name="chain_transforms")
    records = pe.Node(niu.Merge(2), name="registration_records")
    wf.connect([
        (n4, to_ref, [("out_file", "moving")]),
        (inputnode, to_ref, [("ref_native", "fixed"), ("ref_mask", "fixed_mask")]),
        (inputnode, chain, [("ref_to_template", "in1")]),
        (to_ref, chain, [("forward_transforms", "in2")]),
        (chain, to_template, [("out", "transforms")]),
        (inputnode, mask_to_template, [("ref_mask", "in_file"), ("ref_to_template", "transforms")]),
        (inputnode, outputnode, [("ref_mask", "native_mask")]),
        (chain, outputnode, [("out", "to_template")]),
        (to_ref, outputnode, [("affine_file", "affine_file")]),
        (inputnode, records, [("ref_registration", "in1")]),
        (to_ref, records, [("quality", "in2")]),
        (records, outputnode, [("out", "registration")]),
    ])
    return wf
