"""Errors that reach the user, each with its documented exit code.

Every message names the file or option at fault and says what to do about it. The
command line maps these classes to exit codes (docs/usage.md):

======  =====================================================================
code    meaning
======  =====================================================================
0       success
1       processing failure (a workflow step failed)
2       usage error (arguments, paths, labels)
65      input data error (the dataset or one of its files cannot be used)
70      the workflow could not be built (missing model, site without profile)
======  =====================================================================
"""

from __future__ import annotations

__all__ = [
    "EXIT_DATA_ERROR",
    "EXIT_PROCESSING_FAILURE",
    "EXIT_SUCCESS",
    "EXIT_USAGE",
    "EXIT_WORKFLOW_BUILD",
    "IhfBidsError",
    "InputDataError",
    "UsageError",
    "WorkflowBuildError",
]

EXIT_SUCCESS = 0
EXIT_PROCESSING_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA_ERROR = 65
EXIT_WORKFLOW_BUILD = 70


class IhfBidsError(Exception):
    """Base class of the errors ihf-bids reports to the user."""

    exit_code = EXIT_PROCESSING_FAILURE


class UsageError(IhfBidsError):
    """A command-line argument, path or label that cannot be used."""

    exit_code = EXIT_USAGE


class InputDataError(IhfBidsError, ValueError):
    """An input file or dataset that cannot be used (the message names the file and the fix)."""

    exit_code = EXIT_DATA_ERROR


class WorkflowBuildError(IhfBidsError):
    """The workflow cannot be built from these inputs and options."""

    exit_code = EXIT_WORKFLOW_BUILD
