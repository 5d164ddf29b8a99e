"""The harmonization step: IHF-Harmony on one template-space image or DWI run."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nipype.pipeline.engine import Workflow

    from ..config import RunConfig

__all__ = ["init_harmonize_wf"]


def init_harmonize_wf(*, config: RunConfig, modality: str, source_site: str,
                      name: str = "harmonize_wf") -> Workflow:
    """Harmonize a preprocessed image to ``config.target_site`` (or ``config.target_reference``).

    The node claims all of ``config.nprocs`` so that nipype runs one harmonization at a time
    (the network takes the GPU, or all CPU threads).

    Inputs: ``in_file``, ``mask`` (and ``bval`` for DWI). Outputs: ``out_file``, ``provenance``.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from .interfaces import HarmonizeDWI, HarmonizeImage

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(["in_file", "mask", "bval"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(["out_file", "provenance"]), name="outputnode")
    interface = HarmonizeDWI() if modality == "dwi" else HarmonizeImage()
    node = pe.Node(interface, name="harmonize", n_procs=config.nprocs, mem_gb=4.0)
    node.inputs.model_dir = str(config.model_dir)
    node.inputs.modality = modality
    node.inputs.source_site = source_site
    node.inputs.device = config.device
    if config.target_reference is not None and modality != "dwi":
        node.inputs.target_reference = str(config.target_reference)
    else:
        node.inputs.target_site = config.target_site
    wf.connect([
        (inputnode, node, [("in_file", "in_file"), ("mask", "mask_file")]),
        (node, outputnode, [("out_file", "out_file"), ("provenance", "provenance")]),
    ])
    if modality == "dwi":
        wf.connect([(inputnode, node, [("bval", "bval_file")])])
    return wf
