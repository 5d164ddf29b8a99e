"""Anatomical preprocessing: T1w (the subject's reference) and T2w into the template space."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nipype.pipeline.engine import Workflow

    from .base import TemplateFiles

__all__ = ["init_anat_preproc_wf"]

_OUTPUTS = ["preproc", "mask", "native", "native_mask", "native_brain", "to_template", "from_template",
            "from_template_invert", "affine_file", "warp_file", "conform_record"]


def init_anat_preproc_wf(
    *,
    template: TemplateFiles,
    registration: str = "affine",
    random_seed: int = 0,
    is_reference: bool = True,
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
        ``inputnode.ref_native``/``ref_mask``/``ref_to_template``, and shares its brain mask.

    Inputs: ``in_file`` (and, when not the reference, ``ref_native``, ``ref_mask``,
    ``ref_to_template``). Outputs: ``preproc`` and ``mask`` on the template grid,
    ``native`` (bias-corrected, native space), ``native_mask`` and, for the reference,
    ``native_brain`` (the extracted brain, which DWI references register to), transforms
    and the conform record.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .interfaces import (
        ApplyTransforms,
        ConformAnatomical,
        MaskImage,
        N4BiasCorrection,
        NormalizeIntensity,
        RegisterImages,
        TemplateBrainMask,
    )

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(["in_file", "ref_native", "ref_mask", "ref_to_template"]),
                        name="inputnode")
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
        extract = pe.Node(MaskImage(), name="extract_brain")
        brain = pe.Node(TemplateBrainMask(voxel_size=template.anat_resolution, mode=registration,
                                          random_seed=random_seed), name="brain_mask")
        wf.connect([
            (n4, brain, [("out_file", "in_file")]),
            (brain, to_template, [("forward_transforms", "transforms")]),
            (brain, mask_to_template, [("mask_file", "in_file"), ("forward_transforms", "transforms")]),
            (n4, extract, [("out_file", "in_file")]),
            (brain, extract, [("mask_file", "mask_file")]),
            (extract, outputnode, [("out_file", "native_brain")]),
            (brain, outputnode, [("mask_file", "native_mask"), ("forward_transforms", "to_template"),
                                 ("inverse_transforms", "from_template"),
                                 ("inverse_invert", "from_template_invert"),
                                 ("affine_file", "affine_file"), ("warp_file", "warp_file")]),
        ])
        return wf
    # Not the reference: rigid to the reference's native image, then its transforms.
    to_ref = pe.Node(RegisterImages(mode="rigid", random_seed=random_seed), name="register_to_reference")
    chain = pe.Node(niu.Merge(2, ravel_inputs=True), name="chain_transforms")
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
    ])
    return wf
