"""Preprocessing steps as plain functions (antspyx, nibabel, DIPY), testable without nipype."""

from __future__ import annotations
